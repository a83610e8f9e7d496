"""Check the scaling predictor (``asr_parallel.scaling``) against training runs measured on this machine.

1. Trains short runs of the recipe (``--steps`` optimizer steps each, no evaluation) with run.sh's
   stage 5 into ``exp_dir/scaling_validation/``: one rank at one thread; sync SGD, model averaging and
   pipelined BP on 2 ranks of one node; sync SGD on 2 emulated nodes at each of ``--rates`` and
   pipelined BP at the first (``local/emulate_cluster.sh``; needs root, else those runs are left out
   and the report says so). Finished runs are reused.
2. Measures what the predictor takes as input, here: the model's forward and backward time per frame
   and its update time per step at each thread count the runs used (``predict_scaling.measure``),
   and the bandwidth of a gloo
   all-reduce between two processes of this machine (the "link" inside one node).
3. For every run (those of step 1 plus finished experiment directories given with ``--runs``, e.g.
   the comparison's) predicts the mean step time from the measured inputs, the run's own frames per
   step and number of steps, its ranks, nodes and link rate, and sets it against the measured one
   (``train_seconds / steps`` of ``train_summary.json``: the training loop without the per-epoch
   evaluation and checkpoint writes). Sync SGD is predicted with DDP's bucketed overlap of the
   all-reduce behind the backward pass; the periodic strategies with their warm-up
   (:func:`asr_parallel.scaling.mean_step_time`).

Writes ``validation.md`` and ``validation.json`` in ``exp_dir/scaling_validation/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import torch

from asr_parallel.utils.io import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[2]


def cases(rates: list[str]) -> list[tuple[str, list[str], dict]]:
    """(label, overrides, environment) of the short validation runs."""
    one = {"ASR_PARALLEL_THREADS": "1"}
    runs = [("single_1thread", ["strategy.name=single", "train.world_size=1"], one),
            ("sync_sgd_w2", ["strategy.name=sync_sgd", "train.world_size=2"], one),
            ("model_averaging_w2", ["strategy.name=model_averaging", "train.world_size=2"], one),
            ("pipelined_bp_w2", ["strategy.name=pipelined_bp", "train.world_size=2"], one)]
    for i, rate in enumerate(rates):
        nodes = ["train.world_size=2", "train.emulate_nodes=2", f"train.link_rate={rate}"]
        runs.append((f"sync_sgd_w2_2nodes_{rate}", ["strategy.name=sync_sgd"] + nodes, one))
        if i == 0:
            runs.append((f"pipelined_bp_w2_2nodes_{rate}", ["strategy.name=pipelined_bp"] + nodes, one))
    return runs


def _gloo_worker(rank: int, port: int, nbytes: int, repeats: int, out) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    t = torch.ones(nbytes // 4)
    dist.all_reduce(t)  # connect and warm up
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(t)
    dist.barrier()
    if rank == 0:
        out.put(time.perf_counter() - t0)
    dist.destroy_process_group()


def gloo_gbps(nbytes: int, repeats: int = 10) -> float:
    """Gbit/s of a 2-process gloo all-reduce on this machine: each process sends 2(K-1)/K = 1 times the
    tensor per all-reduce (the ring formula), so the rate is repeats * nbytes * 8 / seconds."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_gloo_worker, args=(r, port, nbytes, repeats, q)) for r in range(2)]
    for p in procs:
        p.start()
    seconds = q.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    return repeats * nbytes * 8 / seconds / 1e9


def train_short(config: str, base_overrides: list[str], out: Path, label: str, overrides: list[str], env: dict,
                steps: int) -> Path:
    """Train one validation run with run.sh's stage 5 (reused when finished); its experiment directory."""
    from asr_parallel.bin.train import experiment_dir
    from asr_parallel.config import load_config

    ov = list(base_overrides) + overrides + [f"exp_dir={out}", f"train.max_steps={steps}"]
    exp = experiment_dir(load_config(config, ov))
    if not (exp / "train_summary.json").is_file():
        print(f"=== {label}: {steps} steps into {exp}", flush=True)
        r = subprocess.run(["bash", str(REPO / "run.sh"), "--setup", "false", "--config", config, "--stage", "5",
                            "--stop-stage", "5", "--overrides", " ".join(ov)], cwd=REPO, env={**os.environ, **env})
        if r.returncode != 0:
            raise SystemExit(f"ERROR: scaling validation: run {label} failed (see above); {exp} keeps what it did")
    return exp


def predict_run(exp: Path, compute: dict, intra_gbps: float) -> dict:
    """Measured and predicted mean step time of one finished run."""
    from asr_parallel.bin.predict_scaling import measure, workload
    from asr_parallel.config import load_config
    from asr_parallel.scaling import Cluster, mean_step_time, parse_rate_gbps
    from asr_parallel.strategies import parse_strategy

    summary = json.loads((exp / "train_summary.json").read_text())
    if not summary.get("train_seconds"):
        raise ValueError(f"{exp}/train_summary.json has no train_seconds (trained before they were recorded)")
    cfg = load_config(exp / "config.yaml")
    threads = summary.get("threads_per_rank")
    if not threads:
        raise ValueError(f"{exp}: not a CPU run (no threads_per_rank); the compute inputs are measured on this CPU")
    key = (cfg.model.name, threads)
    if key not in compute:
        torch.set_num_threads(threads)
        compute[key] = measure(cfg, steps=5)
    fwd, bwd, upd = compute[key]
    steps, k, nodes = summary["steps"], summary["world_size"], summary.get("nodes", 1)
    strategy = {"name": summary["strategy"]["name"], **dataclasses.asdict(parse_strategy(summary["strategy"]))}
    work = workload(cfg, fwd, bwd, summary["frames_per_rank"] / steps, upd)
    work.bucket_mb = strategy.get("bucket_cap_mb") or work.bucket_mb
    work.buckets = (summary.get("strategy_figures") or {}).get("ddp_bucket_bytes")  # what DDP really built
    # per-node rates: the slowest link paces every collective
    inter = min(parse_rate_gbps(r) for r in summary["link_rate"].split(",")) if nodes > 1 else intra_gbps
    cluster = Cluster(workers_per_node=max(1, k // nodes), nodes=nodes, intra_gbps=intra_gbps, inter_gbps=inter)
    pred = mean_step_time(strategy, k, cluster, work, steps, overlap=strategy["name"] == "sync_sgd")
    measured = summary["train_seconds"] / steps
    return {"run": exp.name, "exp_dir": str(exp), "strategy": strategy["name"], "ranks": k, "nodes": nodes,
            "link": summary["link_rate"] if nodes > 1 else f"{intra_gbps:.2f}gbit (gloo, one machine)",
            "threads_per_rank": threads, "steps": steps, "frames_per_step": round(work.frames_per_step, 1),
            "bytes_sent_per_rank": summary["bytes_sent_per_rank"], "measured_step_s": measured,
            "predicted_step_s": pred["step_s"], "predicted_compute_s": pred["compute_s"],
            "predicted_comm_s": pred["comm_s"],
            "error_percent": round(100 * (pred["step_s"] - measured) / measured, 1)}


def markdown(rows: list[dict], compute: dict, intra_gbps: float) -> str:
    lines = ["Inputs measured here: " + "; ".join(f"{m} at {t} thread(s): {f * 1e6:.1f} + {b * 1e6:.1f} us per frame "
                                                  f"(forward + backward), {u * 1e3:.1f} ms per update"
                                                  for (m, t), (f, b, u) in sorted(compute.items()))
             + f"; gloo all-reduce between 2 processes of this machine: {intra_gbps:.2f} Gbit/s.", "",
             "| run | strategy | ranks | nodes | link | steps | frames/step | measured s/step | predicted s/step "
             "(compute + comm) | error |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['run']} | {r['strategy']} | {r['ranks']} | {r['nodes']} | {r['link']} | {r['steps']} "
                     f"| {r['frames_per_step']:.0f} | {r['measured_step_s']:.3f} | {r['predicted_step_s']:.3f} "
                     f"({r['predicted_compute_s']:.3f} + {r['predicted_comm_s']:.3f}) | {r['error_percent']:+.1f}% |")
    errs = [abs(r["error_percent"]) for r in rows]
    if errs:
        lines += ["", f"Mean absolute error {sum(errs) / len(errs):.1f}%, largest {max(errs):.1f}% ({len(rows)} runs)."]
    return "\n".join(lines)


def main(argv=None):
    import argparse

    from asr_parallel.config import add_config_args, load_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--steps", type=int, default=100, help="optimizer steps of each short run")
    p.add_argument("--rates", default="100mbit,500mbit", help="link rates of the 2-node runs (tc syntax)")
    p.add_argument("--runs", nargs="*", default=[], help="finished experiment directories to check as well")
    p.add_argument("--no-train", action="store_true", help="only check finished runs")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    out = Path(cfg.exp_dir) / "scaling_validation"
    dirs, skipped = [], []
    if not args.no_train:
        for label, overrides, env in cases([r for r in args.rates.split(",") if r]):
            if "train.emulate_nodes=2" in overrides and os.geteuid() != 0:
                skipped.append(f"{label}: emulated nodes need root")
                continue
            dirs.append(train_short(args.config, args.overrides, out, label, overrides, env, args.steps))
    dirs += [Path(d) for d in args.runs]
    intra = gloo_gbps(16 * 2**20)
    compute: dict = {}
    rows = []
    for d in dirs:
        try:
            rows.append(predict_run(d, compute, intra))
        except (OSError, ValueError, KeyError) as e:
            skipped.append(f"{d}: {e}")
    table = markdown(rows, compute, intra)
    if skipped:
        table += "\n\nLeft out: " + "; ".join(skipped) + "."
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "validation.md", table + "\n")
    atomic_write_json(out / "validation.json", {"intra_gbps": intra, "compute_s_per_frame": {
        f"{m}@{t}": {"forward": f, "backward": b, "update_per_step": u} for (m, t), (f, b, u) in compute.items()}, "runs": rows,
        "left_out": skipped})
    print(table)
    print(f"written: {out}/validation.md, validation.json")


if __name__ == "__main__":
    main()
