"""Stage 8: train, decode and score every run of ``compare.runs`` and set them side by side.

For each run (a strategy, its number of ranks and optional config overrides) the effective config
is written to ``exp_dir/compare/configs/<label>.yaml`` and run.sh's stages 5-7 run on it (a finished
training or decoding is reused). With ``train.emulate_nodes`` N > 1 the runs of two or more ranks are
spread over N emulated nodes (``local/emulate_cluster.sh``) and everything goes to
``exp_dir/compare_{N}nodes_{rate}/`` instead; the single-process runs are those of one node. Then, in
that folder (``exp_dir/compare/`` for one node):

* ``comparison.md`` and ``comparison.json``: per run dev and eval WER per condition (WFST), wall-clock
  to finish training, time to reach ``compare.target_dev_wer`` (greedy dev worn WER of the per-epoch
  evaluation), frames per second, bytes sent per rank, staleness where it applies, peak memory;
* ``tensorboard/<label>/``: the run's strategy and parameters as TensorBoard HParams with WER, time and
  bytes as metrics (HParams view), and the per-epoch dev WER against wall-clock seconds
  (``compare/dev_wer_vs_seconds``) and against bytes sent (``compare/dev_wer_vs_bytes``) for the
  Scalars view's overlays;
* ``dev_wer_vs_time.png`` and ``dev_wer_vs_bytes.png``: one line per run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from asr_parallel.config import ConfigError, dump_config, load_config
from asr_parallel.stages import experiment_parser
from asr_parallel.utils.io import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[2]


def run_label(run: dict) -> str:
    from asr_parallel.strategies import run_name

    if run.get("label"):
        return str(run["label"])
    extra = "_".join(o.replace("=", "").replace(".", "-") for o in run.get("overrides", []))
    return f"{run_name(run['strategy'])}_w{run.get('world_size', 1)}" + (f"_{extra}" if extra else "")


def run_config(args, run: dict):
    cfg = load_config(args.config, list(args.overrides) + list(run.get("overrides", []))
                      + [f"train.world_size={run.get('world_size', 1)}"])
    cfg.strategy = dict(run["strategy"])
    if cfg.train.world_size < max(2, cfg.train.emulate_nodes):
        # a run of fewer ranks than emulated nodes (the single-process baseline) sends nothing over the
        # links: it runs, and is reused, as on one node
        cfg.train.emulate_nodes = 0
    from asr_parallel.config import validate

    validate(cfg)
    return cfg


def comparison_name(cfg) -> str:
    """``compare``, or ``compare_{N}nodes_{rate}`` for a comparison on N emulated nodes."""
    if cfg.train.emulate_nodes > 1:
        return f"compare_{cfg.train.emulate_nodes}nodes_{cfg.train.link_rate}"
    return "compare"


def time_to_reach(history: list[dict], target: float) -> float | None:
    for row in history:
        if row.get("dev_wer_greedy") is not None and row["dev_wer_greedy"] <= target:
            return row["elapsed_seconds"]
    return None


def collect(label: str, run: dict, exp: Path, target: float) -> dict:
    results = json.loads((exp / "results.json").read_text())
    summary = json.loads((exp / "train_summary.json").read_text())
    wfst = results.get("wfst", results.get("greedy"))
    row = {"label": label, "strategy": run["strategy"], "world_size": summary["world_size"],
           "exp_dir": str(exp), "steps": summary["steps"], "wall_seconds": summary["wall_seconds"],
           "time_to_target_seconds": time_to_reach(summary.get("history", []), target),
           "frames_per_second": summary["frames_per_second"],
           "bytes_sent_per_rank": summary["bytes_sent_per_rank"],
           "staleness": summary.get("strategy_figures", {}).get("staleness"),
           "peak_memory_mb": summary.get("peak_memory_mb"),
           "history": summary.get("history", [])}
    for split in ("dev", "eval"):
        for cond in ("worn", "array"):
            if split in wfst and cond in wfst[split]:
                row[f"{split}_{cond}_wer"] = wfst[split][cond]["total"]["wer"]
    return row


def markdown(rows: list[dict], target: float) -> str:
    head = ("| run | ranks | dev worn | dev array | eval worn | eval array | training wall (s) | time to "
            f"greedy dev worn <= {target:g}% (s) | frames/s | bytes sent per rank | staleness | peak memory (MB) |")
    lines = [head, "|" + "---|" * 12]

    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    for r in rows:
        stale = "-" if not r["staleness"] else ", ".join(f"{v:g}" for v in r["staleness"])
        lines.append(f"| {r['label']} | {r['world_size']} | {f(r.get('dev_worn_wer'))} | {f(r.get('dev_array_wer'))} "
                     f"| {f(r.get('eval_worn_wer'))} | {f(r.get('eval_array_wer'))} | {f(r['wall_seconds'], '{:.0f}')} "
                     f"| {f(r['time_to_target_seconds'], '{:.0f}')} | {f(r['frames_per_second'], '{:.0f}')} "
                     f"| {r['bytes_sent_per_rank']:,} | {stale} | {f(r['peak_memory_mb'], '{:.0f}')} |")
    return "\n".join(lines)


def hparams_of(row: dict) -> dict:
    hp = {"strategy": row["strategy"]["name"], "world_size": row["world_size"]}
    for k, v in row["strategy"].items():
        if k != "name":
            hp[f"strategy.{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return hp


METRICS = {"hparam/dev_worn_wer": "dev_worn_wer", "hparam/eval_worn_wer": "eval_worn_wer",
           "hparam/dev_array_wer": "dev_array_wer", "hparam/wall_seconds": "wall_seconds",
           "hparam/bytes_sent_per_rank": "bytes_sent_per_rank", "hparam/frames_per_second": "frames_per_second"}


def write_tensorboard(out: Path, rows: list[dict]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    for row in rows:
        logdir = out / "tensorboard" / row["label"]
        if logdir.exists():
            import shutil

            shutil.rmtree(logdir)  # rewritten from the runs' results on every comparison
        w = SummaryWriter(str(logdir))
        for h in row["history"]:
            if h.get("dev_wer_greedy") is None:
                continue
            w.add_scalar("compare/dev_wer_vs_seconds", h["dev_wer_greedy"], int(round(h["elapsed_seconds"])))
            w.add_scalar("compare/dev_wer_vs_bytes", h["dev_wer_greedy"], int(h.get("bytes_sent", 0)))
        metrics = {tag: float(row[key]) for tag, key in METRICS.items() if row.get(key) is not None}
        w.add_hparams(hparams_of(row), metrics, run_name=".")
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


def main(argv=None):
    p = experiment_parser(__doc__)
    p.add_argument("--collect-only", action="store_true", help="only gather finished runs (no training)")
    args = p.parse_args(argv)
    try:
        base = load_config(args.config, args.overrides)
        if not base.compare.runs:
            raise ConfigError(f"{args.config}: compare.runs is empty; list the runs to compare")
        plans = [(run_label(r), r, run_config(args, r)) for r in base.compare.runs]
    except ConfigError as e:
        print(f"ERROR: stage 8 (compare): {e}", file=sys.stderr)
        raise SystemExit(1)
    from asr_parallel.bin.train import experiment_dir

    out = Path(base.exp_dir) / comparison_name(base)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    rows = []
    for label, run, cfg in plans:
        exp = experiment_dir(cfg)
        if not args.collect_only:
            path = out / "configs" / f"{label}.yaml"
            dump_config(cfg, path)
            print(f"=== {label}: training, decoding and scoring into {exp}", flush=True)
            r = subprocess.run(["bash", str(REPO / "run.sh"), "--setup", "false", "--config", str(path),
                                "--stage", "5", "--stop-stage", "7"], cwd=REPO)
            if r.returncode != 0:
                print(f"ERROR: stage 8 (compare): run {label} failed (see above); {exp} keeps what it finished",
                      file=sys.stderr)
                raise SystemExit(1)
        if not (exp / "results.json").is_file():
            print(f"ERROR: stage 8 (compare): {exp}/results.json missing; run the comparison without "
                  "--collect-only", file=sys.stderr)
            raise SystemExit(1)
        rows.append(collect(label, run, exp, base.compare.target_dev_wer))
    table = markdown(rows, base.compare.target_dev_wer)
    atomic_write_text(out / "comparison.md", table + "\n")
    atomic_write_json(out / "comparison.json", {"target_dev_wer": base.compare.target_dev_wer, "runs": rows})
    write_tensorboard(out, rows)
    plot(out, rows)
    print(table)
    print(f"written: {out}/comparison.md, comparison.json, tensorboard/ (tensorboard --logdir {out}/tensorboard), "
          "dev_wer_vs_time.png, dev_wer_vs_bytes.png")


if __name__ == "__main__":
    main()
