"""The paired bootstrap of two runs of a comparison, from its committed files alone.

Stage 8 (:mod:`asr_parallel.bin.compare`) writes ``scores.json`` next to ``comparison.json``: every
run's per-utterance error and word counts per test set. This reads them back and runs the same
paired bootstrap (Bisani and Ney, ICASSP 2004; :func:`asr_parallel.score.significance.paired_bootstrap`)
with the resamples, level, unit and seed that ``comparison.json`` records, so a pair that a table
did not list (or one a results file quotes) can be checked without the run directories::

    python -m asr_parallel.bin.pair results/compare_x.scores.json sync_sgd_w2_seed42 bmuf_w2_seed42

Two experiment directories of stages 5-7 (outside any comparison, e.g. the default recipe run twice with
different settings) are paired the same way from their decodings::

    python -m asr_parallel.bin.pair --experiments exp/a/conformer_single_w1 exp/b/conformer_single_w1

each at the LM weight its own ``results.json`` chose on dev worn (``--method greedy`` for greedy CTC),
with stage 8's defaults (1000 resamples, 0.95, utterances) unless given.

The first argument is a comparison folder, its ``scores.json``, or a copy of it whose name ends in
``scores.json``; the settings come from ``comparison.json`` beside it (a copy named
``<name>.scores.json`` reads ``<name>.json``), or from the options. Prints one line per set: the
difference RUN - REFERENCE in WER points with its interval, probability of improvement and verdict;
``--json`` prints the figures as stage 8 stores them in ``comparison.json``'s ``pairs``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from asr_parallel.bin.compare import BOOTSTRAP_SEED


def _paths(arg: str) -> tuple[Path, Path]:
    p = Path(arg)
    if p.is_dir():
        return p / "scores.json", p / "comparison.json"
    if p.name == "scores.json":
        return p, p.with_name("comparison.json")
    if p.name.endswith(".scores.json"):
        return p, p.with_name(p.name[:-len(".scores.json")] + ".json")
    raise SystemExit(f"ERROR: {p}: give a comparison folder, its scores.json, or a file named <name>.scores.json")


def load_scores(path: Path) -> dict:
    """``{run label: {set: UtteranceScores}}`` of a ``scores.json``."""
    from asr_parallel.score.significance import UtteranceScores

    if not path.is_file():
        raise SystemExit(f"ERROR: {path}: missing (stage 8 writes scores.json since this tool exists; run "
                         "the comparison again with --collect-only while its run directories are there)")
    try:
        doc = json.loads(path.read_text())
        sets, runs = doc["sets"], doc["runs"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SystemExit(f"ERROR: {path}: not a comparison's scores.json ({e})")
    out = {}
    for label, per_set in runs.items():
        out[label] = {}
        for key, entry in per_set.items():
            ref = {**sets[key], **{k: entry[k] for k in ("ids", "speakers", "sessions") if k in entry}}
            if not len(ref["ids"]) == len(entry["errors"]) == len(entry["words"]):
                raise SystemExit(f"ERROR: {path}: run {label}, set {key}: {len(entry['errors'])} error counts for "
                                 f"{len(ref['ids'])} utterances")
            out[label][key] = UtteranceScores(tuple(ref["ids"]), np.asarray(entry["errors"], dtype=np.int64),
                                              np.asarray(entry["words"], dtype=np.int64), tuple(ref["speakers"]),
                                              tuple(ref["sessions"]))
    return out


def load_experiment(exp: Path, method: str = "wfst") -> dict:
    """``{set: UtteranceScores}`` of an experiment directory's decodings, as stage 8 reads a run's:
    WFST at the LM weight its ``results.json`` chose (else greedy), or greedy."""
    from asr_parallel.bin.compare import decode_method, utterance_scores

    results = exp / "results.json"
    if not results.is_file():
        raise SystemExit(f"ERROR: {results}: missing; decode and score this experiment (stages 6-7) first")
    try:
        folder = decode_method(json.loads(results.read_text())) if method == "wfst" else "greedy"
    except json.JSONDecodeError as e:
        raise SystemExit(f"ERROR: {results}: not JSON ({e})")
    sets = utterance_scores(exp, folder)
    if not sets:
        raise SystemExit(f"ERROR: {exp / 'decode' / folder}: no decoded sets (*.jsonl)")
    return sets


def pair(scores: dict, reference: str, run: str, resamples: int, level: float, unit: str,
         seed: int = BOOTSTRAP_SEED) -> dict:
    """``{set: paired bootstrap as a dict}`` of ``run`` against ``reference``, sets both runs have."""
    from asr_parallel.score.significance import paired_bootstrap

    for label in (reference, run):
        if label not in scores:
            raise SystemExit(f"ERROR: no run '{label}' in the scores; runs: {', '.join(scores)}")
    out = {}
    if not set(scores[run]) & set(scores[reference]):
        raise SystemExit(f"ERROR: {reference} ({', '.join(scores[reference]) or 'no sets'}) and {run} "
                         f"({', '.join(scores[run]) or 'no sets'}) have no test set in common")
    for key, s in scores[run].items():
        if key in scores[reference]:
            out[key] = paired_bootstrap(scores[reference][key], s, num_resamples=resamples, level=level, seed=seed,
                                        unit=unit, name_a=f"{reference} ({key})", name_b=f"{run} ({key})").to_dict()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scores", nargs="?", help="a comparison folder, its scores.json, or <name>.scores.json")
    ap.add_argument("reference", nargs="?", help="the reference run's label (as in comparison.json)")
    ap.add_argument("run", nargs="?", help="the run compared with it")
    ap.add_argument("--experiments", nargs=2, metavar=("REFERENCE_EXP", "RUN_EXP"),
                    help="pair two experiment directories instead (stages 6-7 done in each)")
    ap.add_argument("--method", choices=("wfst", "greedy"), default="wfst", help="with --experiments")
    ap.add_argument("--resamples", type=int, help="default: comparison.json's (else 1000)")
    ap.add_argument("--level", type=float, help="default: comparison.json's (else 0.95)")
    ap.add_argument("--unit", help="utterance, speaker or session; default: comparison.json's (else utterance)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    if args.experiments:
        if args.scores:
            ap.error("give either --experiments or a comparison's scores with two labels, not both")
        ref_exp, run_exp = (Path(e) for e in args.experiments)
        args.reference, args.run = str(ref_exp), str(run_exp)
        scores = {args.reference: load_experiment(ref_exp, args.method),
                  args.run: load_experiment(run_exp, args.method)}
        sig = {}
    elif args.method != "wfst":
        ap.error("--method applies to --experiments only (a comparison's scores are its runs' chosen decodings)")
    elif not (args.scores and args.reference and args.run):
        ap.error("give a comparison's scores and two run labels, or --experiments A B")
    else:
        scores_path, table_path = _paths(args.scores)
        sig = json.loads(table_path.read_text()).get("significance", {}) if table_path.is_file() else {}
        scores = None
    if not sig and not args.experiments and not (args.resamples and args.level and args.unit):
        print(f"note: no {table_path} beside the scores: stage 8's defaults (1000 resamples, 0.95, utterances) "
              "unless given", file=sys.stderr)
    resamples = args.resamples or sig.get("resamples", 1000)
    level = args.level or sig.get("level", 0.95)
    unit = args.unit or sig.get("unit", "utterance")
    result = pair(scores if scores is not None else load_scores(scores_path), args.reference, args.run,
                  resamples, level, unit, sig.get("seed", BOOTSTRAP_SEED))
    if args.json:
        print(json.dumps({"reference": args.reference, "run": args.run, **result}, indent=2))
        return
    print(f"{args.run} against {args.reference}: WER difference (points), {100 * level:g}% paired-bootstrap "
          f"interval ({resamples} resamples of {unit}s), probability of improvement")
    for key, t in result.items():
        lo, hi = t["difference_ci"]
        print(f"  {key}: {t['difference']:+.2f} [{lo:+.2f}, {hi:+.2f}] poi {t['poi']:.2f} {t['verdict']}")


if __name__ == "__main__":
    sys.exit(main())
