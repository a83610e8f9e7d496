"""Stage 6: decode dev and eval (worn and array microphones) with the trained model: greedy CTC and
WFST search over TLG, tuned on dev worn over decode.lm_weights x decode.blank_penalty. Hypotheses per utterance go to
EXP/decode/; decoding speed (real-time factors) to EXP/decode/timing.json."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from asr_parallel.config import ConfigError, load_config
from asr_parallel.stages import experiment_parser
from asr_parallel.utils.io import StageMarker, atomic_write_json
from asr_parallel.utils.logging import setup_logging


def main(argv=None):
    p = experiment_parser(__doc__)
    p.add_argument("--force", action="store_true", help="decode again even if done")
    args = p.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        import sentencepiece as spm
        import torch

        from asr_parallel.bin.prepare_graph import graph_paths
        from asr_parallel.bin.train import experiment_dir
        from asr_parallel.decode.run import decode_all
        from asr_parallel.models import build_model
        from asr_parallel.tokenizer import lang_dir_name

        exp = Path(args.exp_dir) if args.exp_dir else experiment_dir(cfg)
        final = exp / "final.pt"
        if not final.is_file():
            raise FileNotFoundError(f"{final}: no trained model; run stage 5 (train) first")
        _, graph = graph_paths(cfg)
        if "wfst" in cfg.decode.methods and not graph.is_file():
            raise FileNotFoundError(f"{graph}: no decoding graph; run stage 4 (graph) first" + (
                f" (decode.lm_extra_text {cfg.decode.lm_extra_text}: a graph is built per content of the file)"
                if cfg.decode.lm_extra_text.strip() not in ("auto", "none") else ""))
        st = final.stat()
        # the model, the decoding options and the graph: its directory and what stage 4 built it from
        # (its marker's fingerprint), so a graph built from other inputs decodes again
        from asr_parallel.bin.prepare_graph import graph_marker_suffix

        built = Path(cfg.data_dir) / ".done" / f"stage4_graph{graph_marker_suffix(cfg)}.done"
        graph_stamp = [str(graph), json.loads(built.read_text()).get("fingerprint") if built.is_file() else None]
        fp = hashlib.sha256(json.dumps([str(final), st.st_mtime_ns, cfg.to_dict()["decode"], graph_stamp]
                                       ).encode()).hexdigest()[:16]
        marker = StageMarker(exp, "decode", fp)
        if marker.is_done() and not args.force:
            print(f"{exp}/decode: already decoded with this model and these options; skipping")
            return
        lang = Path(cfg.data_dir) / lang_dir_name(cfg.tokenizer)
        sp = spm.SentencePieceProcessor(model_file=str(lang / "bpe.model"))
        device = torch.device("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
        model = build_model(cfg.model, cfg.features.num_mel_bins, sp.get_piece_size())
        model.load_state_dict(torch.load(final, map_location="cpu", weights_only=True)["model"])
        model.to(device)
        timing = decode_all(model, device, sp, Path(cfg.data_dir), exp / "decode", cfg.decode, graph,
                            graph.parent / "words.txt")
        atomic_write_json(exp / "decode" / "timing.json", timing)
        print(f"decoded {timing['audio_seconds'] / 60:.1f} min of audio: real-time factor "
              f"{timing['rtf_greedy']:.4f} greedy" + (f", {timing['rtf_wfst']:.4f} WFST" if "rtf_wfst" in timing else ""))
        marker.mark_done()
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"ERROR: stage 6 (decode): {e}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
