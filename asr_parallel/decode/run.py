"""Decoding of the evaluation sets: network outputs once, then greedy and WFST search.

For every evaluation set (dev and eval; worn and array microphones) the network's log-probabilities
are computed once; greedy CTC decoding and WFST decoding at every LM weight of the config then run
on them. Hypotheses go to ``exp/decode/{method}[_lmwt{w}]/{split}_{mic}.jsonl``, one line per
utterance with its reference, session, speaker and location, for scoring.
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


def utterance_row(cut_id: str, sup, hyp: str) -> dict:
    custom = sup.custom or {}
    return {"id": cut_id, "session": sup.recording_id, "speaker": sup.speaker,
            "location": custom.get("location", ""), "ref": sup.text, "hyp": hyp}


def write_rows(path: Path, rows: list[dict]) -> None:
    import json

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def decode_all(model, device, sp, data_dir: Path, decode_dir: Path, cfg, graph_path: Path | None,
               words_path: Path | None) -> dict:
    """Decode every evaluation set with every method; returns timing figures (real-time factors)."""
    from lhotse import load_manifest

    timing = {"audio_seconds": 0.0, "network_seconds": 0.0, "greedy_seconds": 0.0, "wfst_seconds": 0.0,
              "wfst_decodes": 0}
    decoder = None
    if "wfst" in cfg.methods:
        from asr_parallel.decode.wfst import WfstDecoder

        decoder = WfstDecoder(graph_path, words_path, cfg.beam, cfg.max_active, cfg.min_active)
    for split, mic, path in eval_sets(data_dir, ["ihm", "mdm"]):
        cuts = load_manifest(path)
        timing["audio_seconds"] += sum(c.duration for c in cuts)
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
            for w in cfg.lm_weights:
                t0 = time.perf_counter()
                rows = [utterance_row(cut_id, sup, " ".join(decoder.decode(lp, w, cfg.blank_penalty)))
                        for cut_id, (lp, sup) in outputs.items()]
                timing["wfst_seconds"] += time.perf_counter() - t0
                timing["wfst_decodes"] += 1
                write_rows(decode_dir / f"wfst_lmwt{w:g}" / f"{name}.jsonl", rows)
        log.info("decoded %s (%d utterances)", name, len(outputs))
    a = max(timing["audio_seconds"], 1e-9)
    timing["rtf_network"] = timing["network_seconds"] / a
    timing["rtf_greedy"] = (timing["network_seconds"] + timing["greedy_seconds"]) / a
    if timing["wfst_decodes"]:
        # one WFST pass over all sets at one LM weight, plus the network
        timing["rtf_wfst"] = (timing["network_seconds"] + timing["wfst_seconds"] / len(cfg.lm_weights)) / a
    return timing
