"""Stage 8: train, decode and score every run of ``compare.runs`` and set them side by side.

For each run (a strategy, its number of ranks and optional config overrides) the effective config
is written to ``exp_dir/compare/configs/<label>.yaml`` and run.sh's stages 5-7 run on it, after stage 4 has
built the decoding graph of every distinct LM among the runs (skipped when built) (a finished
training or decoding is reused). With ``compare.seeds`` every run is trained once per seed
(``train.seed=<s>``, into ``exp_dir/seed<s>/``, labelled ``<label>_seed<s>``). A run whose overrides
change what is trained (``train.lr``, ``train.momentum``: a sweep; ``model.name``) trains under
``<label>/`` of that directory, so that it never meets another run of the list. With
``train.emulate_nodes`` N > 1 the runs of two or more ranks are spread over N emulated nodes
(``local/emulate_cluster.sh``) and everything goes to ``exp_dir/compare_{N}nodes_{rate}/`` instead;
the single-process runs are those of one node. Then, in that folder (``exp_dir/compare/`` for one
node):

* ``comparison.md`` and ``comparison.json``: per run dev and eval WER per condition (WFST at the LM
  weight chosen on dev worn, as stage 7) with its bootstrap confidence interval, and against the
  baseline run (``compare.baseline``, else the first; with seeds, the baseline of the same seed) the
  paired bootstrap's interval of the WER difference and probability of improvement, "tie" when the
  interval contains 0 (Bisani and Ney 2004; :mod:`asr_parallel.score.significance`, on the
  per-utterance errors of ``decode/<method>/<set>.jsonl``); wall-clock to finish training, time to
  reach ``compare.target_dev_wer`` (greedy dev worn WER of the per-epoch evaluation), frames per
  second, bytes sent per rank, staleness where it applies, peak memory; with seeds, the mean, standard
  deviation, minimum and maximum over seeds after each run's per-seed rows;
* ``tensorboard/<label>/``: the per-epoch dev WER against wall-clock seconds
  (``compare/dev_wer_vs_seconds``) and against bytes sent (``compare/dev_wer_vs_bytes``), which the
  Time Series page shows first (its cards are grouped by the tag's first component, in tag order, and
  the HParams metrics are ``hparam/...``) and the Custom Scalars page overlays in one chart each; the
  HParams view's columns: strategy, ranks, model, seed and every parameter of every strategy compared
  (defaults filled in; a run whose strategy lacks a numeric parameter leaves it empty, a text one reads
  "-"), with WER, time and bytes as metrics;
* ``dev_wer_vs_time.png`` and ``dev_wer_vs_bytes.png``: one line per run;
* ``scores.json``: every run's per-utterance error and reference word counts per set (the test sets'
  utterance, speaker and session ids once), so that the paired bootstrap of any two runs of the table
  can be computed again from the committed files alone, without the run directories:
  ``python -m asr_parallel.bin.pair <folder or scores.json> REFERENCE RUN``
  (:mod:`asr_parallel.bin.pair`; the same resamples as this stage's).
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from asr_parallel.config import ConfigError, RecipeConfig, dump_config, load_config
from asr_parallel.stages import experiment_parser
from asr_parallel.utils.io import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[2]
SETS = [(split, cond) for split in ("dev", "eval") for cond in ("worn", "array")]
BOOTSTRAP_SEED = 0  # the resampled test sets are the same for every run and every comparison


def run_label(run: dict) -> str:
    from asr_parallel.strategies import run_name

    if run.get("label"):
        return str(run["label"])
    extra = "_".join(o.replace("=", "").replace(".", "-") for o in run.get("overrides", []))
    return f"{run_name(run['strategy'])}_w{run.get('world_size', 1)}" + (f"_{extra}" if extra else "")


def run_config(args, run: dict, seed: int | None = None, exp_dir: str | None = None):
    """The effective config of ``run``; with ``seed``, trained with ``train.seed=seed`` into ``exp_dir``."""
    seeded = [] if seed is None else [f"train.seed={seed}", f"exp_dir={exp_dir}"]

    def build(own: list[str]):
        cfg = load_config(args.config, list(args.overrides) + own
                          + [f"train.world_size={run.get('world_size', 1)}"] + seeded)
        cfg.strategy = dict(run["strategy"])
        if cfg.train.world_size < max(2, cfg.train.emulate_nodes):
            # a run of fewer ranks than emulated nodes (the single-process baseline) sends nothing over
            # the links: it runs, and is reused, as on one node
            cfg.train.emulate_nodes = 0
            cfg.train.ranks_per_node = []
        return cfg

    cfg = build(list(run.get("overrides", [])))
    if run.get("overrides"):
        # A run whose overrides change what is trained (train.lr, train.momentum, model.name, ...) could
        # share its experiment directory (named by model, strategy and ranks only) with another run of
        # the list: it trains under exp_dir/<label>/ instead, whichever other runs the list holds.
        from asr_parallel.train.trainer import training_fingerprint

        if training_fingerprint(cfg) != training_fingerprint(build([])):
            cfg.exp_dir = str(Path(cfg.exp_dir) / re.sub(r"[^A-Za-z0-9._=+-]", "_", run_label(run)))
    from asr_parallel.config import validate

    validate(cfg)
    return cfg


@dataclass
class Plan:
    """One training of the comparison."""

    label: str  # its row, TensorBoard run and config file: the run's label, + _seed<s> with compare.seeds
    run_label: str  # the run's label
    run: dict
    cfg: RecipeConfig
    seed: int | None  # None: the config's train.seed, in the single-seed layout


def plan_runs(args, base: RecipeConfig) -> list[Plan]:
    """Every training of ``compare.runs`` (once per seed of ``compare.seeds``, or of the run's own
    ``seeds``)."""
    labels = [run_label(r) for r in base.compare.runs]
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise ConfigError(f"{base.source}: compare.runs has several runs labelled {', '.join(repeated)}; "
                          "give them distinct 'label's")
    plans = []
    for label, run in zip(labels, base.compare.runs):
        if not base.compare.seeds:
            plans.append(Plan(label, label, run, run_config(args, run), None))
        for seed in run.get("seeds", base.compare.seeds):
            cfg = run_config(args, run, seed, str(Path(base.exp_dir) / f"seed{seed}"))
            plans.append(Plan(f"{label}_seed{seed}", label, run, cfg, seed))
    check_directories(base, plans)
    return plans


def check_directories(base: RecipeConfig, plans: list[Plan]) -> None:
    """Two runs of the list that would train different things into one directory (overrides that
    differ among runs which all have some) stop the comparison before anything trains."""
    from asr_parallel.bin.train import experiment_dir
    from asr_parallel.train.trainer import training_fingerprint

    seen: dict = {}
    for plan in plans:
        exp, fp = experiment_dir(plan.cfg), training_fingerprint(plan.cfg)
        other = seen.setdefault(exp, (plan.label, fp))
        if other[1] != fp:
            raise ConfigError(f"{base.source}: compare.runs: {other[0]} and {plan.label} would train different "
                              f"configs into {exp}; give them labels that differ in more than the characters "
                              "outside [A-Za-z0-9._=+-] (a run whose overrides change training settings trains "
                              "under exp_dir/<label>/)")


def baseline_label(base: RecipeConfig) -> str:
    """The run label ``compare.baseline`` names (a label, or the strategy of exactly one run)."""
    labels = [run_label(r) for r in base.compare.runs]
    wanted = base.compare.baseline
    if not wanted:
        return labels[0]
    if wanted in labels:
        return wanted
    by_strategy = [label for label, r in zip(labels, base.compare.runs) if r["strategy"]["name"] == wanted]
    if len(by_strategy) == 1:
        return by_strategy[0]
    if by_strategy:
        raise ConfigError(f"{base.source}: compare.baseline '{wanted}' is the strategy of several runs "
                          f"({', '.join(by_strategy)}); name one by its label")
    raise ConfigError(f"{base.source}: compare.baseline '{wanted}' is neither the label nor the strategy of a run; "
                      f"runs: {', '.join(labels)}")


def comparison_name(cfg) -> str:
    """``compare``, or ``compare_{N}nodes_{rate}`` for a comparison on N emulated nodes."""
    if cfg.train.emulate_nodes > 1:
        return f"compare_{cfg.train.emulate_nodes}nodes_{cfg.train.link_rate.replace(',', '-')}"
    return "compare"


def time_to_reach(history: list[dict], target: float) -> float | None:
    """Elapsed seconds at the first per-epoch evaluation whose greedy dev WER is <= ``target``."""
    for row in history:
        if row.get("dev_wer_greedy") is not None and row["dev_wer_greedy"] <= target:
            return row["elapsed_seconds"]
    return None


def trained_seed(exp: Path, plan: Plan) -> int:
    """The ``train.seed`` the experiment was trained with (its ``config.yaml``): a seeded run trained
    with another seed stops the comparison; in the single-seed layout it is reported, with a warning."""
    import yaml

    expected = plan.cfg.train.seed
    path = exp / "config.yaml"
    if not path.is_file():
        return expected
    seed = (yaml.safe_load(path.read_text()) or {}).get("train", {}).get("seed", expected)
    if seed != expected:
        if plan.seed is not None:
            raise ValueError(f"{path}: {plan.label} was trained with train.seed={seed}, not {expected}; "
                             f"delete {exp} to train it again")
        print(f"WARNING: stage 8 (compare): {exp} was trained with train.seed={seed}, the config says {expected}; "
              f"its figures are reported with seed {seed}", file=sys.stderr)
    return seed


def decode_method(results: dict) -> str:
    """The decoding the WERs of ``results.json`` come from: WFST at the chosen LM weight (and blank
    penalty), else greedy."""
    from asr_parallel.decode.run import wfst_dir_name

    if "wfst" in results and "lm_weight" in results["wfst"]:
        return wfst_dir_name(results["wfst"]["lm_weight"], results["wfst"].get("blank_penalty", 0.0))
    return "greedy"


def utterance_scores(exp: Path, method: str) -> dict:
    """``{split}_{condition}`` -> per-utterance error counts of ``exp/decode/<method>/<set>.jsonl``."""
    from asr_parallel.decode.run import MIC_NAMES
    from asr_parallel.score.significance import read_scores

    out = {}
    for path in sorted((exp / "decode" / method).glob("*.jsonl")):
        split, mic = path.stem.split("_")
        out[f"{split}_{MIC_NAMES.get(mic, mic)}"] = read_scores(path)
    return out


def staleness(figures: dict) -> list | None:
    """The staleness column: per stage for pipelines, [mean, max] of the applied pushes for the
    asynchronous strategies."""
    if figures.get("staleness") is not None:
        return figures["staleness"]
    if "staleness_mean" in figures:
        return [figures["staleness_mean"], figures["staleness_max"]]
    return None


def collect(plan: Plan, exp: Path, target: float) -> tuple[dict, dict]:
    """The row of one training, and its per-utterance error counts per set."""
    results = json.loads((exp / "results.json").read_text())
    summary = json.loads((exp / "train_summary.json").read_text())
    method = decode_method(results)
    wfst = results.get("wfst", results.get("greedy"))
    row = {"label": plan.label, "run": plan.run_label, "seed": trained_seed(exp, plan),
           "strategy": plan.run["strategy"], "world_size": summary["world_size"],
           "model": summary.get("model", plan.cfg.model.name),
           "exp_dir": str(exp), "decode": method, "steps": summary["steps"], "wall_seconds": summary["wall_seconds"],
           "time_to_target_seconds": time_to_reach(summary.get("history", []), target),
           "frames_per_second": summary["frames_per_second"],
           "bytes_sent_per_rank": summary["bytes_sent_per_rank"],
           # the training loop alone (no per-epoch evaluation or checkpoint writes)
           "train_seconds": summary.get("train_seconds"),
           # what rank 0's link counted (emulated nodes only), and every call rank 0 made
           "wire_bytes_sent": (summary.get("wire") or {}).get("bytes_sent_per_rank", [None])[0],
           "calls": summary.get("collective_calls"),
           # the figures behind those columns, kept so that a committed table can be checked
           "calls_this_process": summary.get("calls_this_process"), "bytes_by_label": summary.get("bytes_by_label"),
           "predicted": summary.get("predicted"), "wire": summary.get("wire"),
           "strategy_figures": summary.get("strategy_figures"), "code": summary.get("code"),
           "staleness": staleness(summary.get("strategy_figures") or {}),
           "peak_memory_mb": summary.get("peak_memory_mb"),
           "history": summary.get("history", [])}
    scores = utterance_scores(exp, method)
    for split, cond in SETS:
        if split in wfst and cond in wfst[split]:
            key = f"{split}_{cond}"
            row[f"{key}_wer"] = wfst[split][cond]["total"]["wer"]
            if key not in scores:
                raise FileNotFoundError(f"{exp}/decode/{method}: no decoding of {split} {cond} behind results.json; "
                                        "decode (stage 6) and score (stage 7) again")
            if round(scores[key].wer, 2) != row[f"{key}_wer"]:
                raise ValueError(f"{exp}/results.json gives {split} {cond} WER {row[f'{key}_wer']}, but "
                                 f"{exp}/decode/{method} scores {scores[key].wer:.2f}; score (stage 7) again")
    return row, scores


def scores_document(scores: dict) -> dict:
    """``scores.json``: per set the utterance ids, speakers and sessions of the first run that has it,
    and per run and set its error and word counts aligned with them (a run scored on other
    utterances keeps its own ids)."""
    sets: dict[str, dict] = {}
    runs: dict[str, dict] = {}
    for label, per_set in scores.items():
        runs[label] = {}
        for key, s in per_set.items():
            ref = sets.setdefault(key, {"ids": list(s.ids), "speakers": list(s.speakers), "sessions": list(s.sessions)})
            entry = {"errors": [int(x) for x in s.errors], "words": [int(x) for x in s.words]}
            if list(s.ids) != ref["ids"]:
                entry.update(ids=list(s.ids), speakers=list(s.speakers), sessions=list(s.sessions))
            runs[label][key] = entry
    return {"format": "asr_parallel comparison scores 1", "sets": sets, "runs": runs}


def add_significance(rows: list[dict], scores: dict, baseline: str, cc) -> None:
    """Each row's WER intervals (``<set>_wer_ci``) and, against the baseline run of the same seed,
    the paired bootstrap (``vs_baseline``)."""
    from asr_parallel.score.significance import bootstrap_wer, paired_bootstrap

    opts = {"num_resamples": cc.bootstrap_resamples, "level": cc.confidence_level, "seed": BOOTSTRAP_SEED,
            "unit": cc.bootstrap_unit}
    base_rows = {r["seed"] if cc.seeds else None: r for r in rows if r["run"] == baseline}
    for row in rows:
        for key, s in scores[row["label"]].items():
            if f"{key}_wer" in row:
                row[f"{key}_wer_ci"] = bootstrap_wer(s, **opts).to_dict()["ci"]
        ref = base_rows.get(row["seed"] if cc.seeds else None)
        if row["run"] != baseline and ref is None:
            print(f"WARNING: stage 8 (compare): no baseline run {baseline} of seed {row['seed']}: {row['label']} is "
                  "not tested against it", file=sys.stderr)
        if row["run"] == baseline or ref is None:
            row["vs_baseline"] = None
            continue
        row["vs_baseline"] = {"baseline": ref["label"]}
        for key, s in scores[row["label"]].items():
            if f"{key}_wer" in row and key in scores[ref["label"]]:
                paired = paired_bootstrap(scores[ref["label"]][key], s, name_a=f"{ref['label']} ({key})",
                                          name_b=f"{row['label']} ({key})", **opts)
                row["vs_baseline"][key] = paired.to_dict()


def add_pairs(rows: list[dict], scores: dict, pairs: list[list[str]], cc) -> list[dict]:
    """``compare.pairs``: for each [reference, run] of run labels, the paired bootstrap of the run
    against the reference, seed by seed (the same test-set resamples for both)."""
    from asr_parallel.score.significance import paired_bootstrap

    opts = {"num_resamples": cc.bootstrap_resamples, "level": cc.confidence_level, "seed": BOOTSTRAP_SEED,
            "unit": cc.bootstrap_unit}
    out = []
    for ref_run, run in pairs:
        for ref in (r for r in rows if r["run"] == ref_run):
            other = next((r for r in rows if r["run"] == run and r["seed"] == ref["seed"]), None)
            if other is None:
                print(f"WARNING: stage 8 (compare): compare.pairs [{ref_run}, {run}]: no run {run} of seed {ref['seed']}",
                      file=sys.stderr)
                continue
            entry = {"reference": ref["label"], "run": other["label"]}
            for key, s in scores[other["label"]].items():
                if f"{key}_wer" in other and key in scores[ref["label"]]:
                    entry[key] = paired_bootstrap(scores[ref["label"]][key], s, name_a=f"{ref['label']} ({key})",
                                                  name_b=f"{other['label']} ({key})", **opts).to_dict()
            out.append(entry)
    return out


def _spread(values: list) -> dict | None:
    import numpy as np

    if not values or any(v is None for v in values):
        return None
    a = np.asarray(values, dtype=float)
    return {"mean": round(float(a.mean()), 2), "std": round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 2),
            "min": round(float(a.min()), 2), "max": round(float(a.max()), 2), "n": len(a)}


def seed_summary(rows: list[dict]) -> list[dict]:
    """Per run with ``compare.seeds``: mean, sample standard deviation, min and max over its seeds of
    WER and time figures, and how often it was better, tied or worse than the baseline."""
    out = []
    for run in dict.fromkeys(r["run"] for r in rows):
        group = [r for r in rows if r["run"] == run]
        entry = {"run": run, "seeds": [r["seed"] for r in group], "labels": [r["label"] for r in group]}
        for split, cond in SETS:
            if any(f"{split}_{cond}_wer" in r for r in group):
                entry[f"{split}_{cond}_wer"] = _spread([r.get(f"{split}_{cond}_wer") for r in group])
        for key in ("wall_seconds", "frames_per_second", "bytes_sent_per_rank"):
            entry[key] = _spread([r[key] for r in group])
        reached = [r["time_to_target_seconds"] for r in group if r["time_to_target_seconds"] is not None]
        entry["time_to_target_seconds"] = _spread(reached) if len(reached) == len(group) else None
        entry["reached_target"] = len(reached)
        vs = [r["vs_baseline"] for r in group if r.get("vs_baseline")]
        entry["vs_baseline"] = None
        if vs:
            entry["vs_baseline"] = {}
            for split, cond in SETS:
                key = f"{split}_{cond}"
                tests = [v[key] for v in vs if key in v]
                if tests:
                    counts = {k: sum(t["verdict"] == k for t in tests) for k in ("better", "tie", "worse")}
                    entry["vs_baseline"][key] = {"difference": _spread([t["difference"] for t in tests]), **counts}
        out.append(entry)
    return out


def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def _wer_cell(row: dict, key: str) -> str:
    wer, ci = row.get(f"{key}_wer"), row.get(f"{key}_wer_ci")
    if wer is None:
        return "-"
    return f"{wer:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{wer:.2f}"


def _spread_cell(s: dict | None, fmt: str = "{:.2f}") -> str:
    if s is None:
        return "-"
    return f"{fmt.format(s['mean'])} ± {fmt.format(s['std'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"


def _paired_cell(t: dict | None) -> str:
    if t is None:
        return "-"
    return (f"{t['difference']:+.2f} [{t['difference_ci'][0]:+.2f}, {t['difference_ci'][1]:+.2f}] poi {t['poi']:.2f} "
            f"{t['verdict']}")


def markdown(rows: list[dict], target: float, baseline: str = "", summaries: list[dict] | None = None,
             level: float = 0.95, resamples: int = 1000, unit: str = "utterance", pairs: list[dict] | None = None) -> str:
    pct = f"{100 * level:g}%"
    head = ("| run | ranks | dev worn | dev array | eval worn | eval array | training wall (s) | training loop (s) "
            f"| time to greedy dev worn <= {target:g}% (s) | frames/s | bytes sent per rank, modelled "
            "| bytes sent by rank 0's node, on the wire | calls per rank | staleness | peak memory (MB) |")
    lines = [head, "|" + "---|" * 15]
    by_run = {s["run"]: s for s in summaries or []}
    for i, r in enumerate(rows):
        stale = "-" if not r["staleness"] else ", ".join(f"{v:g}" for v in r["staleness"])
        wers = " | ".join(_wer_cell(r, f"{split}_{cond}") for split, cond in SETS)
        wire = "-" if r.get("wire_bytes_sent") is None else f"{r['wire_bytes_sent']:,}"
        lines.append(f"| {r['label']} | {r['world_size']} | {wers} | {_f(r['wall_seconds'], '{:.0f}')} "
                     f"| {_f(r.get('train_seconds'), '{:.0f}')} "
                     f"| {_f(r['time_to_target_seconds'], '{:.0f}')} | {_f(r['frames_per_second'], '{:.0f}')} "
                     f"| {r['bytes_sent_per_rank']:,} | {wire} | {_f(r.get('calls'), '{:,}')} | {stale} "
                     f"| {_f(r['peak_memory_mb'], '{:.0f}')} |")
        s = by_run.get(r["run"])
        if s and len(s["seeds"]) > 1 and (i + 1 == len(rows) or rows[i + 1]["run"] != r["run"]):
            wers = " | ".join(_spread_cell(s.get(f"{split}_{cond}_wer")) for split, cond in SETS)
            ttt = _spread_cell(s["time_to_target_seconds"], "{:.0f}") if s["time_to_target_seconds"] else \
                f"reached by {s['reached_target']} of {len(s['seeds'])}"
            lines.append(f"| **{r['run']}**: mean ± std (min-max) over {len(s['seeds'])} seeds | {r['world_size']} "
                         f"| {wers} | {_spread_cell(s['wall_seconds'], '{:.0f}')} | - | {ttt} "
                         f"| {_spread_cell(s['frames_per_second'], '{:.0f}')} | - | - | - | - | - |")
    lines += ["", f"WER (%) of WFST decoding at the LM weight chosen on dev worn (greedy without WFST), with its {pct} "
              f"bootstrap confidence interval ({resamples} resampled test sets of {unit}s; Bisani and Ney 2004)."]
    compared = [r for r in rows if r.get("vs_baseline")]
    if compared:
        lines += ["", f"Against the baseline {baseline}" + (" of the same seed" if summaries else "")
                  + f": WER difference (run - baseline, points) with its {pct} paired-bootstrap interval, probability "
                  "of improvement (poi: share of resampled test sets on which the run has the lower WER, ties "
                  "counted one half), and the verdict: tie when the interval contains 0.", "",
                  "| run | baseline | dev worn | dev array | eval worn | eval array |", "|" + "---|" * 6]
        for i, r in enumerate(rows):
            vs = r.get("vs_baseline")
            if vs:
                cells = [_paired_cell(vs.get(f"{split}_{cond}")) for split, cond in SETS]
                lines.append(f"| {r['label']} | {vs['baseline']} | " + " | ".join(cells) + " |")
            s = by_run.get(r["run"])
            if s and len(s["seeds"]) > 1 and s["vs_baseline"] and (i + 1 == len(rows) or rows[i + 1]["run"] != r["run"]):
                cells = []
                for split, cond in SETS:
                    t = s["vs_baseline"].get(f"{split}_{cond}")
                    cells.append("-" if t is None else f"mean {t['difference']['mean']:+.2f}: better {t['better']}, "
                                 f"tie {t['tie']}, worse {t['worse']}")
                lines.append(f"| **{r['run']}** over {len(s['seeds'])} seeds | {baseline} | "
                             + " | ".join(cells) + " |")
    if pairs:
        lines += ["", f"Pairs of runs (compare.pairs), seed by seed: WER difference (run - reference, points) with its "
                  f"{pct} paired-bootstrap interval, poi and verdict as above.", "",
                  "| run | reference | dev worn | dev array | eval worn | eval array |", "|" + "---|" * 6]
        for e in pairs:
            lines.append(f"| {e['run']} | {e['reference']} | "
                         + " | ".join(_paired_cell(e.get(f"{split}_{cond}")) for split, cond in SETS) + " |")
    return "\n".join(lines)


def _hparam_value(v):
    return v if isinstance(v, (bool, int, float, str)) else json.dumps(v)


def hparams_table(rows: list[dict]) -> tuple[list[dict], dict]:
    """Every row's HParams: strategy, world_size, model, seed, and ``strategy.<p>`` for every parameter
    of every strategy compared, defaults filled in (:func:`asr_parallel.strategies.parse_strategy`).
    A run whose strategy lacks a parameter leaves a number out and reads "-" for a text; a parameter
    that is a number in one strategy and a text in another is a text everywhere. Also returns, for
    the text columns, their values (TensorBoard's discrete domains)."""
    from asr_parallel.strategies import parse_strategy

    params = [{f"strategy.{k}": _hparam_value(v) for k, v in dataclasses.asdict(parse_strategy(r["strategy"])).items()}
              for r in rows]
    names = list(dict.fromkeys(k for p in params for k in sorted(p)))
    text = {k for k in names if any(isinstance(p[k], str) for p in params if k in p)}
    table = []
    for r, p in zip(rows, params):
        hp = {"strategy": r["strategy"]["name"], "world_size": r["world_size"], "model": r["model"], "seed": r["seed"]}
        for k in names:
            if k in p:
                hp[k] = (json.dumps(p[k]) if not isinstance(p[k], str) else p[k]) if k in text else p[k]
            elif k in text:
                hp[k] = "-"
        table.append(hp)
    domains = {k: sorted({hp[k] for hp in table}) for k in ["strategy", "model", *sorted(text)]}
    return table, domains


METRICS = {"hparam/dev_worn_wer": "dev_worn_wer", "hparam/eval_worn_wer": "eval_worn_wer",
           "hparam/dev_array_wer": "dev_array_wer", "hparam/wall_seconds": "wall_seconds",
           "hparam/bytes_sent_per_rank": "bytes_sent_per_rank", "hparam/frames_per_second": "frames_per_second"}
OVERLAYS = {"compare/dev_wer_vs_seconds": "greedy dev worn WER against training wall-clock (s)",
            "compare/dev_wer_vs_bytes": "greedy dev worn WER against bytes sent per rank"}


def write_tensorboard(out: Path, rows: list[dict]) -> None:
    """One TensorBoard run per row (the folder is rewritten from the runs' results every time).

    TensorBoard's HParams view takes its columns from the experiment summary of whichever run it
    reads first, so every run carries the same one, listing the union of the runs' hyperparameters.
    The Time Series page groups cards by the tag's first component, in tag order: ``compare/...``
    comes before the single-point ``hparam/...`` metrics. The Custom Scalars page gets both overlays.
    """
    import shutil

    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    root = out / "tensorboard"
    if root.exists():
        shutil.rmtree(root)  # also drops runs no longer compared
    table, domains = hparams_table(rows)
    union = {}
    for hp in table:
        for k, v in hp.items():
            union.setdefault(k, v)
    metric_tags = {tag: 0.0 for tag, key in METRICS.items() if any(r.get(key) is not None for r in rows)}
    experiment, _, _ = hparams(union, metric_tags, {k: v for k, v in domains.items() if k in union})
    layout = {"compare": {title: ["Multiline", [f"^{tag}$"]] for tag, title in OVERLAYS.items()}}
    for row, hp in zip(rows, table):
        w = SummaryWriter(str(root / row["label"]))
        for h in row["history"]:
            if h.get("dev_wer_greedy") is None:
                continue
            w.add_scalar("compare/dev_wer_vs_seconds", h["dev_wer_greedy"], int(round(h["elapsed_seconds"])))
            w.add_scalar("compare/dev_wer_vs_bytes", h["dev_wer_greedy"], int(h.get("bytes_sent", 0)))
        w.add_custom_scalars(layout)
        metrics = {tag: float(row[key]) for tag, key in METRICS.items() if row.get(key) is not None}
        _, start, end = hparams(hp, metrics)
        fw = w._get_file_writer()  # what SummaryWriter.add_hparams writes to, without its sub-run
        for summary in (experiment, start, end):
            fw.add_summary(summary)
        for tag, value in metrics.items():
            w.add_scalar(tag, value)
        w.close()


def plot(out: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, xlabel, name in (("elapsed_seconds", "training wall-clock (s)", "dev_wer_vs_time.png"),
                              ("bytes_sent", "bytes sent per rank", "dev_wer_vs_bytes.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        for row in rows:
            pts = [(h.get(key, 0), h["dev_wer_greedy"]) for h in row["history"] if h.get("dev_wer_greedy") is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=row["label"])
        if key == "bytes_sent" and any(h.get("bytes_sent") for r in rows for h in r["history"]):
            ax.set_xscale("symlog")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("greedy dev worn WER (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        tmp = out / (name + ".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(out / name)


def check_pairs(base: RecipeConfig, source) -> None:
    """Every ``compare.pairs`` entry names two runs of ``compare.runs`` by their labels (a recipe
    inherits its base's pairs: one that lists other runs must set its own, ``pairs: []`` for none)."""
    labels = [run_label(r) for r in base.compare.runs]
    for pair in base.compare.pairs:
        unknown = [x for x in pair if x not in labels]
        if len(pair) != 2 or unknown:
            raise ConfigError(f"{source}: compare.pairs entry {pair} must name two runs by their labels; "
                              f"runs: {', '.join(labels)}")


def select_runs(base: RecipeConfig, source) -> None:
    """Keep the runs that ``compare.only`` names (all when it is empty) and the pairs between them;
    a baseline left out must be named anew."""
    cc = base.compare
    if not cc.only:
        return
    labels = [run_label(r) for r in cc.runs]
    unknown = [x for x in cc.only if x not in labels]
    if unknown:
        raise ConfigError(f"{source}: compare.only names {', '.join(unknown)}, not a run label; "
                          f"runs: {', '.join(labels)}")
    if cc.baseline and baseline_label(base) not in cc.only:
        raise ConfigError(f"{source}: compare.baseline '{cc.baseline}' is not among compare.only; "
                          "add it, or set compare.baseline to one of them")
    cc.runs = [r for label, r in zip(labels, cc.runs) if label in cc.only]
    cc.pairs = [p for p in cc.pairs if all(x in cc.only for x in p)]


def main(argv=None):
    p = experiment_parser(__doc__)
    p.add_argument("--collect-only", action="store_true", help="only gather finished runs (no training)")
    args = p.parse_args(argv)
    try:
        base = load_config(args.config, args.overrides)
        if not base.compare.runs:
            raise ConfigError(f"{args.config}: compare.runs is empty; list the runs to compare")
        check_pairs(base, args.config)
        select_runs(base, args.config)
        plans = plan_runs(args, base)
        baseline = baseline_label(base)
    except ConfigError as e:
        print(f"ERROR: stage 8 (compare): {e}", file=sys.stderr)
        raise SystemExit(1)
    from asr_parallel.bin.train import experiment_dir

    cc = base.compare
    out = Path(base.exp_dir) / comparison_name(base)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    rows, scores = [], {}
    if not args.collect_only:  # the decoding graph of every distinct LM among the runs (stage 4, skipped when built)
        graphs = {}
        for plan in plans:
            graphs.setdefault(plan.cfg.fingerprint("tokenizer", "decode"), plan)
        for i, plan in enumerate(graphs.values()):
            path = out / "configs" / f"graph{i}.yaml"
            dump_config(plan.cfg, path)
            r = subprocess.run([sys.executable, "-m", "asr_parallel.bin.prepare_graph", "--config", str(path)], cwd=REPO)
            if r.returncode != 0:
                print("ERROR: stage 8 (compare): the decoding graph could not be built (see above)", file=sys.stderr)
                raise SystemExit(1)
    for plan in plans:
        exp = experiment_dir(plan.cfg)
        if not args.collect_only:
            path = out / "configs" / f"{plan.label}.yaml"
            dump_config(plan.cfg, path)
            print(f"=== {plan.label}: training, decoding and scoring into {exp}", flush=True)
            r = subprocess.run(["bash", str(REPO / "run.sh"), "--setup", "false", "--config", str(path),
                                "--stage", "5", "--stop-stage", "7"], cwd=REPO)
            if r.returncode != 0:
                print(f"ERROR: stage 8 (compare): run {plan.label} failed (see above); {exp} keeps what it finished",
                      file=sys.stderr)
                raise SystemExit(1)
        if not (exp / "results.json").is_file():
            print(f"ERROR: stage 8 (compare): {exp}/results.json missing; run the comparison without "
                  "--collect-only", file=sys.stderr)
            raise SystemExit(1)
        try:
            row, scores[plan.label] = collect(plan, exp, cc.target_dev_wer)
        except (FileNotFoundError, ValueError) as e:
            print(f"ERROR: stage 8 (compare): {e}", file=sys.stderr)
            raise SystemExit(1)
        rows.append(row)
    try:
        add_significance(rows, scores, baseline, cc)
        pairs = add_pairs(rows, scores, cc.pairs, cc)
    except ValueError as e:
        print(f"ERROR: stage 8 (compare): {e}", file=sys.stderr)
        raise SystemExit(1)
    summaries = seed_summary(rows) if cc.seeds else None
    table = markdown(rows, cc.target_dev_wer, baseline, summaries, cc.confidence_level, cc.bootstrap_resamples,
                     cc.bootstrap_unit, pairs)
    atomic_write_text(out / "comparison.md", table + "\n")
    atomic_write_json(out / "comparison.json", {
        "target_dev_wer": cc.target_dev_wer, "baseline": baseline, "seeds": cc.seeds,
        "significance": {"method": "bootstrap over the test set (Bisani and Ney, ICASSP 2004); paired for differences",
                         "resamples": cc.bootstrap_resamples, "level": cc.confidence_level,
                         "unit": cc.bootstrap_unit, "seed": BOOTSTRAP_SEED,
                         "verdict": "tie when the difference's interval contains 0, else better (lower WER) or worse"},
        "runs": rows, **({"seed_summary": summaries} if summaries is not None else {}),
        **({"pairs": pairs} if pairs else {})})
    atomic_write_json(out / "scores.json", scores_document(scores), indent=None)
    write_tensorboard(out, rows)
    plot(out, rows)
    print(table)
    print(f"written: {out}/comparison.md, comparison.json, scores.json, tensorboard/ (tensorboard --logdir {out}/tensorboard), "
          "dev_wer_vs_time.png, dev_wer_vs_bytes.png")


if __name__ == "__main__":
    main()
