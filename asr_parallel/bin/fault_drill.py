"""Fault drill: inject faults into short training runs of a recipe and report how each run ended.

For every strategy asked for, an uninterrupted run and a run in which rank 1 is killed (SIGKILL)
after step ``--fault-step``; for synchronous SGD also a rank stopped (SIGSTOP) at that step (the
others time out after ``--timeout`` seconds), and a run killed without restarts whose newest
checkpoint is then truncated and which is started again. Every run goes through run.sh's stage 5
(the launcher, torchrun with ``train.max_restarts``), and faults are injected by the trainer's
``ASR_PARALLEL_FAULT`` hook. With root, two runs on 2 emulated nodes: through the rendezvous path
(``train.emulate_nodes``) and through the launcher's SLURM path with the variables srun would set,
and (with synchronous SGD among the strategies) rank 1, alone on node 1, killed and stopped.

Reported per run: how it ended (exit status, restarts seen), its wall-clock (measured around the
whole stage, start-up included), the time lost against the uninterrupted run of the same strategy,
the steps done again (the fault's step minus the checkpoint resumed from), and whether its final
parameters equal the uninterrupted run's (``torch.equal`` on every tensor).

    python -m asr_parallel.bin.fault_drill --config recipes/chime6_sim.yaml --out results/fault_drill
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from asr_parallel.config import add_config_args

REPO = Path(__file__).resolve().parents[2]
STRATEGIES = {"sync_sgd": ["strategy.name=sync_sgd"],
              "bmuf": ["strategy.name=bmuf", "strategy.sync_period=10", "strategy.warmup_steps=10"],
              "pipelined_bp": ["strategy.name=pipelined_bp"]}


def stage5(config: str, overrides: list[str], env: dict | None = None) -> tuple[int, float, str]:
    """run.sh stage 5; (exit status, wall seconds, output)."""
    t0 = time.time()
    r = subprocess.run(["bash", str(REPO / "run.sh"), "--setup", "false", "--config", config, "--stage", "5",
                        "--stop-stage", "5", "--overrides", " ".join(overrides)], cwd=REPO, capture_output=True,
                       text=True, env={**os.environ, **(env or {})})
    return r.returncode, time.time() - t0, r.stdout + r.stderr


def final_model(exp: Path) -> dict | None:
    import torch

    runs = sorted(exp.glob("*_w2*"))
    if not runs or not (runs[0] / "final.pt").is_file():
        return None
    return torch.load(runs[0] / "final.pt", weights_only=True)["model"]


def same(a: dict | None, b: dict | None) -> bool:
    import torch

    return a is not None and b is not None and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def resumed_step(out: str) -> int | None:
    m = re.findall(r"resuming from \S*checkpoint-(\d{8})", out)
    return int(m[-1]) if m else None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--exp-dir", default="exp/fault_drill", help="where the drill's runs go (emptied first)")
    p.add_argument("--out", default="results/fault_drill", help="writes OUT.json and OUT.md")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    p.add_argument("--checkpoint-every", type=int, default=20)
    p.add_argument("--fault-step", type=int, default=30, help="rank 1 is killed or stopped after this step")
    p.add_argument("--corrupt-step", type=int, default=50,
                   help="the corrupt-checkpoint run is killed after this step (two checkpoints before it)")
    p.add_argument("--timeout", type=float, default=20.0, help="train.collective_timeout of the SIGSTOP run")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    args = p.parse_args(argv)
    import shutil

    root = Path(args.exp_dir)
    shutil.rmtree(root, ignore_errors=True)
    base = list(args.overrides) + ["train.world_size=2", f"train.max_steps={args.steps}",
                                   f"train.checkpoint_every_steps={args.checkpoint_every}", "train.keep_checkpoints=3"]
    rows = []
    wholes: dict = {}

    def record(name, strategy, fault, rc, wall, out, exp, whole):
        restarts = out.count("resuming from")  # each start of the group that found a checkpoint
        rows.append({"run": name, "strategy": strategy, "fault": fault, "exit_status": rc,
                     "wall_seconds": round(wall, 1),
                     "lost_seconds": round(wall - whole["wall_seconds"], 1) if whole else None,
                     "resumed_from_step": resumed_step(out), "resumes": restarts,
                     "equals_uninterrupted": same(final_model(exp), whole and whole["model"]) if whole else None})
        print(json.dumps(rows[-1]), flush=True)
        if rc != 0 and fault != "kill, no restart":
            print(out[-3000:], file=sys.stderr)

    for strategy in args.strategies:
        exp = root / f"{strategy}_whole"
        rc, wall, out = stage5(args.config, base + STRATEGIES[strategy] + [f"exp_dir={exp}"])
        whole = wholes[strategy] = {"wall_seconds": wall, "model": final_model(exp)}
        record("uninterrupted", strategy, "none", rc, wall, out, exp, None)
        exp = root / f"{strategy}_kill"
        rc, wall, out = stage5(args.config, base + STRATEGIES[strategy] + [f"exp_dir={exp}", "train.max_restarts=1"],
                               {"ASR_PARALLEL_FAULT": f"kill:1:{args.fault_step}"})
        record(f"rank 1 killed after step {args.fault_step}", strategy, "SIGKILL", rc, wall, out, exp, whole)
        if strategy != "sync_sgd":
            continue
        exp = root / "sync_sgd_stop"
        rc, wall, out = stage5(args.config, base + STRATEGIES[strategy] + [
            f"exp_dir={exp}", "train.max_restarts=1", f"train.collective_timeout={args.timeout:g}"],
            {"ASR_PARALLEL_FAULT": f"stop:1:{args.fault_step}"})
        record(f"rank 1 stopped after step {args.fault_step} (timeout {args.timeout:g} s)", strategy, "SIGSTOP", rc,
               wall, out, exp, whole)
        m = re.search(r"ERROR: stage 5 \(train\), rank 0: (.*)", out)
        rows[-1]["error"] = m.group(1)[:300] if m else None
        exp = root / "sync_sgd_corrupt"
        rc, wall1, out = stage5(args.config, base + STRATEGIES[strategy] + [f"exp_dir={exp}", "train.max_restarts=0"],
                                {"ASR_PARALLEL_FAULT": f"kill:1:{args.corrupt_step}"})
        run = next(exp.glob("*_w2"))
        newest = sorted(run.glob("checkpoint-*[0-9]"))[-1] / "rank1.pt"
        newest.write_bytes(newest.read_bytes()[:1000])
        rc, wall2, out = stage5(args.config, base + STRATEGIES[strategy] + [f"exp_dir={exp}", "train.max_restarts=0"])
        record(f"rank 1 killed after step {args.corrupt_step} without restarts, rank 1's file of the newest "
               "checkpoint truncated, run again",
               strategy, "SIGKILL + corrupt checkpoint", rc, wall1 + wall2, out, exp, whole)
        rows[-1]["warning"] = next((line for line in out.splitlines() if "is unusable" in line), None)
    if os.geteuid() == 0:
        exp = root / "emulated_rendezvous"
        rc, wall, out = stage5(args.config, base + STRATEGIES["sync_sgd"] + [
            f"exp_dir={exp}", "train.emulate_nodes=2", "train.link_rate=1gbit"])
        record("2 emulated nodes, rendezvous path", "sync_sgd", "none", rc, wall, out, exp, None)
        emulated_wall = wall
        rows[-1]["commands"] = [line for line in out.splitlines() if line.startswith("launch_train: ")]
        exp = root / "emulated_slurm"
        sets = " ".join(f"--set {shlex.quote(o)}" for o in base + STRATEGIES["sync_sgd"] + [f"exp_dir={exp}"])
        node = ("ASR_PARALLEL_SLURM_STEP=1 SLURM_JOB_ID=4242 SLURM_NNODES=2 SLURM_NODEID=$NODE_RANK "
                f"SLURM_PROCID=$NODE_RANK ASR_PARALLEL_THREADS=1 {sys.executable} -m asr_parallel.bin.launch "
                f"--launcher slurm --local-addr $NODE_ADDR --config {shlex.quote(args.config)} {sets}")
        t0 = time.time()
        r = subprocess.run(["bash", str(REPO / "local/emulate_cluster.sh"), "--nodes", "2", "--rate", "1gbit", "--",
                            "bash", "-c", node], cwd=REPO, capture_output=True, text=True)
        record("2 emulated nodes, SLURM path (SLURM_* faked)", "sync_sgd", "none", r.returncode, time.time() - t0,
               r.stdout + r.stderr, exp, None)
        rows[-1]["commands"] = [line for line in r.stderr.splitlines() if line.startswith("launch_train: ")]
        nodes = ["train.emulate_nodes=2", "train.link_rate=1gbit", "train.max_restarts=1"]
        if "sync_sgd" in wholes:  # time lost against the rendezvous run; the model against the one-node run's
            for fault, extra in (("SIGKILL", []), ("SIGSTOP", [f"train.collective_timeout={args.timeout:g}"])):
                exp = root / f"emulated_{fault.lower()}"
                rc, wall, out = stage5(args.config, base + STRATEGIES["sync_sgd"] + [f"exp_dir={exp}"] + nodes + extra,
                                       {"ASR_PARALLEL_FAULT": f"{'kill' if fault == 'SIGKILL' else 'stop'}:1:"
                                                              f"{args.fault_step}"})
                record(f"2 emulated nodes, rank 1 (node 1) {'killed' if fault == 'SIGKILL' else 'stopped'} after "
                       f"step {args.fault_step}" + (f" (timeout {args.timeout:g} s)" if extra else ""),
                       "sync_sgd", fault, rc, wall, out, exp,
                       {"wall_seconds": emulated_wall, "model": wholes["sync_sgd"]["model"]})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"config": args.config, "overrides": base, "steps": args.steps, "checkpoint_every": args.checkpoint_every,
            "fault_step": args.fault_step, "corrupt_step": args.corrupt_step, "timeout": args.timeout, "cpus": os.cpu_count(), "command": " ".join(sys.argv)}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2) + "\n")
    lines = ["| run | strategy | fault | exit status | wall | time lost | resumed from step | final model equals "
             "the uninterrupted run's |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eq = {True: "yes", False: "**no**", None: "-"}[r["equals_uninterrupted"]]
        lost = f"{r['lost_seconds']:+.1f} s" if r["lost_seconds"] is not None else "-"
        lines.append(f"| {r['run']} | {r['strategy']} | {r['fault']} | {r['exit_status']} | {r['wall_seconds']:.1f} s "
                     f"| {lost} | {r['resumed_from_step'] if r['resumed_from_step'] is not None else '-'} | {eq} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
