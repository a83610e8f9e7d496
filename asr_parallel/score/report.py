"""The WER report of an experiment: per split (dev, eval) and microphone condition (worn, array),
with a breakdown per session and per location, Kaldi-style lines, and ``results.json``.

The LM weight (and blank penalty) of WFST decoding is chosen on dev (worn microphones) and the same
is reported for eval, as Kaldi's CHiME-6 scoring chooses the LM weight on dev: stage 6's choice
(``decode/wfst_choice.json``) where it made one, else the decoding with the lowest dev worn WER.
"""

from __future__ import annotations

import json
from pathlib import Path

from asr_parallel.decode.run import MIC_NAMES, parse_wfst_dir_name
from asr_parallel.score.wer import ErrorCounts, utterance_errors
from asr_parallel.utils.io import atomic_write_json, atomic_write_text


def score_rows(rows: list[dict]) -> dict:
    total, by_session, by_location = ErrorCounts(), {}, {}
    for r in rows:
        c = utterance_errors(r["ref"], r["hyp"])
        if c is None:
            continue
        total.add(c)
        by_session.setdefault(r["session"], ErrorCounts()).add(c)
        if r.get("location"):
            by_location.setdefault(r["location"], ErrorCounts()).add(c)
    return {"total": total, "sessions": dict(sorted(by_session.items())),
            "locations": dict(sorted(by_location.items()))}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def score_experiment(decode_dir: Path) -> tuple[dict, str]:
    """Score every decoding under ``decode_dir``; returns (results, report text)."""
    decode_dir = Path(decode_dir)
    scored: dict[str, dict[str, dict]] = {}  # method dir -> set name -> scores
    for method_dir in sorted(p for p in decode_dir.iterdir() if p.is_dir()):
        for f in sorted(method_dir.glob("*.jsonl")):
            scored.setdefault(method_dir.name, {})[f.stem] = score_rows(read_rows(f))
    results: dict = {}
    lines = []
    # Greedy: as is.
    methods: dict[str, tuple[str, dict]] = {}
    if "greedy" in scored:
        methods["greedy"] = ("greedy", {})
    wfst = {k: v for k, v in scored.items() if k.startswith("wfst_lmwt")}
    if wfst:
        def dev_wer(name):
            s = wfst[name].get("dev_ihm") or next(iter(wfst[name].values()))
            return s["total"].wer

        choice_file = decode_dir / "wfst_choice.json"
        if choice_file.is_file():  # stage 6 chose on dev worn and decoded the other sets with that pair only
            best = json.loads(choice_file.read_text())["dir"]
            if best not in wfst:
                raise ValueError(f"{choice_file}: names {best}, which {decode_dir} does not hold; decode again "
                                 "(stage 6 with --force)")
        else:  # decodings from before the choice file: every set at every LM weight
            best = min(wfst, key=dev_wer)
        weight, penalty = parse_wfst_dir_name(best)
        extra = {"lm_weight": weight, "blank_penalty": penalty}
        extra["dev_worn_wer_by_lm_weight"] = {  # at the chosen blank penalty
            f"{w:g}": round(dev_wer(k), 2) for k in sorted(wfst) for w, p in [parse_wfst_dir_name(k)] if p == penalty}
        if len({parse_wfst_dir_name(k)[1] for k in wfst}) > 1:
            extra["dev_worn_wer_by_setting"] = {k.removeprefix("wfst_"): round(dev_wer(k), 2) for k in sorted(wfst)}
        methods["wfst"] = (best, extra)
    for method, (dirname, extra) in methods.items():
        results[method] = dict(extra)
        lines.append(f"== {method}" + (f" (LM weight {extra['lm_weight']:g}, blank penalty {extra['blank_penalty']:g}, "
                                       "chosen on dev worn)" if extra else ""))
        for set_name, s in scored[dirname].items():
            split, mic = set_name.split("_")
            cond = MIC_NAMES.get(mic, mic)
            entry = {"total": s["total"].to_dict(),
                     "sessions": {k: v.to_dict() for k, v in s["sessions"].items()},
                     "locations": {k: v.to_dict() for k, v in s["locations"].items()}}
            results[method].setdefault(split, {})[cond] = entry
            lines.append(f"{split:4} {cond:5} {s['total'].kaldi()}")
            for sess, c in s["sessions"].items():
                lines.append(f"     {'':5}   session {sess}   {c.kaldi()}")
            for loc, c in s["locations"].items():
                lines.append(f"     {'':5}   location {loc:8} {c.kaldi()}")
    return results, "\n".join(lines)


def summary_table(results: dict) -> str:
    """The final table: WER per split and condition for each method."""
    rows = ["| method | dev worn | dev array | eval worn | eval array |", "|---|---|---|---|---|"]
    for method, r in results.items():
        if not isinstance(r, dict) or "dev" not in r and "eval" not in r:
            continue
        cells = []
        for split in ("dev", "eval"):
            for cond in ("worn", "array"):
                t = r.get(split, {}).get(cond, {}).get("total")
                cells.append(f"{t['wer']:.2f}" if t else "-")
        label = method + (f" (lmwt {r['lm_weight']:g}" + (f", blank penalty {r['blank_penalty']:g}"
                                                            if r.get("blank_penalty") else "") + ")"
                          if "lm_weight" in r else "")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_report(exp_dir: Path, results: dict, report: str, extra: dict | None = None) -> None:
    exp_dir = Path(exp_dir)
    atomic_write_json(exp_dir / "results.json", {**results, **(extra or {})})
    atomic_write_text(exp_dir / "wer_report.txt", report + "\n\n" + summary_table(results) + "\n")
