"""Decoding of the evaluation sets: network outputs once, then greedy and WFST search.

For every evaluation set (dev and eval; worn and array microphones) the network's log-probabilities
are computed once; greedy CTC decoding and WFST decoding then run on them. WFST decoding is tuned as
Kaldi's scoring tunes its LM weight and word insertion penalty: dev worn is decoded at every pair of
``decode.lm_weights`` and ``decode.blank_penalty`` (a list), the pair with the lowest dev worn WER is
chosen (the first in grid order on a tie), and only that pair decodes the other sets; their figures
are thus untuned, dev worn's the best of the grid. Hypotheses go to
``exp/decode/{greedy|wfst_lmwt{w}[_bp{p}]}/{split}_{mic}.jsonl``, one line per utterance with its
reference, session, speaker and location, for scoring; ``decode/wfst_choice.json`` records the grid.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from asr_parallel.decode.greedy import greedy_ctc
from asr_parallel.utils.io import atomic_write_text

log = logging.getLogger(__name__)

MIC_NAMES = {"ihm": "worn", "mdm": "array"}


def eval_sets(data_dir: Path, mics: list[str]) -> list[tuple[str, str, Path]]:
    out = []
    for split in ("dev", "eval"):
        for mic in mics:
            path = Path(data_dir) / "fbank" / f"chime6-{mic}_cuts_{split}.jsonl.gz"
            if path.is_file():
                out.append((split, mic, path))
    return out


@torch.no_grad()
def network_outputs(model, cuts, device, max_duration: float = 200.0) -> dict[str, tuple]:
    """cut id -> (log-probs (T, V) as numpy float32, supervision)."""
    from lhotse.dataset import SimpleCutSampler
    from lhotse.dataset.collation import collate_features

    model.eval()
    out = {}
    for batch in SimpleCutSampler(cuts, max_duration=max_duration, shuffle=False, world_size=1, rank=0):
        feats, lens = collate_features(batch)
        logits, out_lens = model(feats.to(device), lens.to(device))
        log_probs = logits.float().log_softmax(-1).cpu()
        for cut, lp, n in zip(batch, log_probs, out_lens.cpu().tolist()):
            out[cut.id] = (lp[:n].numpy(), cut.supervisions[0])
    return out


def wfst_dir_name(lm_weight: float, blank_penalty: float = 0.0) -> str:
    """``wfst_lmwt{w}``, with ``_bp{p}`` for a non-zero blank penalty (the names of before stay valid)."""
    return f"wfst_lmwt{lm_weight:g}" + (f"_bp{blank_penalty:g}" if blank_penalty else "")


def parse_wfst_dir_name(name: str) -> tuple[float, float]:
    weight, _, penalty = name.removeprefix("wfst_lmwt").partition("_bp")
    return float(weight), float(penalty or 0.0)


def utterance_row(cut_id: str, sup, hyp: str) -> dict:
    custom = sup.custom or {}
    return {"id": cut_id, "session": sup.recording_id, "speaker": sup.speaker,
            "location": custom.get("location", ""), "ref": sup.text, "hyp": hyp}


def write_rows(path: Path, rows: list[dict]) -> None:
    import json

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def decode_all(model, device, sp, data_dir: Path, decode_dir: Path, cfg, graph_path: Path | None,
               words_path: Path | None) -> dict:
    """Decode every evaluation set with every method, WFST tuned on dev worn (module docstring);
    returns timing figures (real-time factors)."""
    import json
    import shutil

    from lhotse import load_manifest

    from asr_parallel.score.report import score_rows

    timing = {"audio_seconds": 0.0, "network_seconds": 0.0, "greedy_seconds": 0.0, "wfst_seconds": 0.0,
              "wfst_decodes": 0, "wfst_audio_seconds": 0.0}
    decode_dir = Path(decode_dir)
    if decode_dir.is_dir():  # an earlier decoding's hypotheses (another grid, another model): not mixed in
        for old in decode_dir.iterdir():
            if old.is_dir() and (old.name == "greedy" or old.name.startswith("wfst_")):
                shutil.rmtree(old)
        (decode_dir / "wfst_choice.json").unlink(missing_ok=True)
    decoder = None
    if "wfst" in cfg.methods:
        from asr_parallel.decode.wfst import WfstDecoder

        decoder = WfstDecoder(graph_path, words_path, cfg.beam, cfg.max_active, cfg.min_active)
    grid = [(w, p) for p in cfg.blank_penalties() for w in cfg.lm_weights]
    sets = eval_sets(data_dir, ["ihm", "mdm"])
    sets.sort(key=lambda s: (s[0], s[1]) != ("dev", "ihm"))  # dev worn first: it chooses the pair
    tuned = any(s[:2] == ("dev", "ihm") for s in sets)
    chosen = None
    for split, mic, path in sets:
        cuts = load_manifest(path)
        audio = sum(c.duration for c in cuts)
        timing["audio_seconds"] += audio
        t0 = time.perf_counter()
        outputs = network_outputs(model, cuts, device)
        timing["network_seconds"] += time.perf_counter() - t0
        name = f"{split}_{mic}"
        if "greedy" in cfg.methods:
            t0 = time.perf_counter()
            rows = []
            for cut_id, (lp, sup) in outputs.items():
                hyp = sp.decode(greedy_ctc(torch.from_numpy(lp)[None], torch.tensor([len(lp)]))[0])
                rows.append(utterance_row(cut_id, sup, hyp))
            timing["greedy_seconds"] += time.perf_counter() - t0
            write_rows(decode_dir / "greedy" / f"{name}.jsonl", rows)
        if decoder is not None:
            points = grid if chosen is None else [chosen]
            wers = {}
            for w, p in points:
                t0 = time.perf_counter()
                rows = [utterance_row(cut_id, sup, " ".join(decoder.decode(lp, w, p)))
                        for cut_id, (lp, sup) in outputs.items()]
                timing["wfst_seconds"] += time.perf_counter() - t0
                timing["wfst_decodes"] += 1
                timing["wfst_audio_seconds"] += audio
                write_rows(decode_dir / wfst_dir_name(w, p) / f"{name}.jsonl", rows)
                wers[(w, p)] = score_rows(rows)["total"].wer
            if tuned and chosen is None:
                chosen = min(grid, key=lambda wp: wers[wp])  # min keeps the first of equals
                atomic_write_text(decode_dir / "wfst_choice.json", json.dumps({
                    "lm_weight": chosen[0], "blank_penalty": chosen[1], "dir": wfst_dir_name(*chosen),
                    "dev_worn_wer": {wfst_dir_name(w, p): round(wers[(w, p)], 2) for w, p in grid}}, indent=1) + "\n")
                log.info("WFST: LM weight %g, blank penalty %g chosen on dev worn (%.2f%% WER)", chosen[0],
                         chosen[1], wers[chosen])
                edges = [name for name, values, v in (("decode.lm_weights", cfg.lm_weights, chosen[0]),
                                                      ("decode.blank_penalty", cfg.blank_penalties(), chosen[1]))
                         if len(values) > 1 and v in (min(values), max(values)) and v != 0.0]
                if edges:  # the best may lie beyond the values tried
                    log.warning("WFST: the pair chosen on dev worn is at the edge of %s; consider a wider grid",
                                " and ".join(edges))
        log.info("decoded %s (%d utterances)", name, len(outputs))
    a = max(timing["audio_seconds"], 1e-9)
    timing["rtf_network"] = timing["network_seconds"] / a
    timing["rtf_greedy"] = (timing["network_seconds"] + timing["greedy_seconds"]) / a
    if timing["wfst_decodes"]:
        # the network, plus the search's seconds per second of audio searched
        timing["rtf_wfst"] = timing["rtf_network"] + timing["wfst_seconds"] / max(timing["wfst_audio_seconds"], 1e-9)
    return timing
