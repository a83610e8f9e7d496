"""Check the scaling predictor (``asr_parallel.scaling``) against training runs measured on this machine.

1. Trains short runs of the recipe (``--steps`` optimizer steps each, no evaluation) with run.sh's
   stage 5 into ``exp_dir/scaling_validation/``: one rank at one thread; sync SGD, model averaging and
   pipelined BP on 2 ranks of one node; sync SGD on 2 emulated nodes at each of ``--rates`` and
   pipelined BP at the first (``local/emulate_cluster.sh``; needs root, else those runs are left out
   and the report says so). Finished runs are reused.
2. Measures what the predictor takes as input, here:
   * the model's forward and backward time per frame and its update time per step, at each thread
     count the runs used, on the recipe's own training batches (``predict_scaling.measure`` with
     ``step_batches``: each rank's batches at 16 steps spread over the steps of the first epoch that
     the run met (all of them, or the first ``steps`` of a shorter run), real lengths and padding;
     synthetic batches without prepared data);
   * for ranks in lock-step (synchronous SGD, synchronous warm-up), how much longer the slowest
     rank's step is than the mean rank's, from the same timings set side by side step by step
     (``predict_scaling.lockstep_factor``). The ranks are timed as a run has them: each a fresh
     process of its own, all working at once, every step begun together
     (``predict_scaling.measure_ranks`` with ``concurrent``; ``--in-turns`` times them one after
     the other in one process instead), so the timings hold what the ranks take from each other on
     a shared machine and its jitter, as a synchronous run's waits do. Periodic strategies' waits at
     their synchronisations (the slowest rank's sum over tau steps) are not modelled; pipelined BP's
     tick, whose parts work on different batches, is the slowest part's time in each tick
     (``predict_scaling.pipeline_lockstep``);
   * for pipelined BP, the clock tick of a plain pipelined-BP loop (torch and torch.distributed calls,
     none of the strategy's training code; the model cut by the strategy's ``model_cut``) with the
     run's own cut, its parts at once in processes of their own
     with gloo between them, part s on batch t - s in tick t (``predict_scaling.measure_pipeline``:
     the parts' contention for the machine, their lock-step, sends, receives and per-tick exchange
     as this machine does them); with ``--in-turns``, each part timed alone
     (``predict_scaling.measure_parts``);
   * the rate of a plain gloo all-reduce between two processes of this machine (the link inside one
     node; measured on 16 MiB, so its messages' latency is in the rate), its latency per message (a
     64-byte all-reduce: it enters only pipelined BP's per-tick exchange of figures, where the tick
     is not measured) and, as root, between two emulated nodes at every tc rate a run used
     (:func:`emulated_gloo_gbps`: TCP/IP headers, tbf's shaping and gloo's own pauses included;
     ``--no-link-benchmark`` takes the nominal rate instead).
3. For every run (those of step 1 plus finished experiment directories given with ``--runs``, e.g.
   the comparison's) predicts the mean step time from the measured inputs, the run's own frames per
   step and number of steps, its ranks, nodes and link, and sets it against the measured one
   (``train_seconds / steps`` of ``train_summary.json``: the training loop without the per-epoch
   evaluation and checkpoint writes). Sync SGD is predicted with DDP's bucketed overlap of the
   all-reduce behind the backward pass; the periodic strategies with their warm-up; pipelined BP
   with the drain ticks of its epoch ends, checkpoints and end, which are not steps
   (:func:`asr_parallel.scaling.mean_step_time`). Beside it, the machine's own pace during the run:
   seconds per step in windows of whole synchronisation periods (median, 10th and 90th percentiles,
   from the TensorBoard log), which shows how far a shared machine moved under the run.

Writes ``validation.md`` and ``validation.json`` in ``exp_dir/scaling_validation/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
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


def _timed_allreduces(init_method: str, rank: int, nbytes: int, repeats: int) -> float:
    """Seconds of ``repeats`` plain gloo all-reduces of ``nbytes`` between 2 processes (after one to
    connect and warm up), as this process saw them."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    t = torch.ones(nbytes // 4)
    dist.all_reduce(t)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(t)
    dist.barrier()
    seconds = time.perf_counter() - t0
    dist.destroy_process_group()
    return seconds


def _gloo_worker(rank: int, port: int, nbytes: int, repeats: int, out) -> None:
    seconds = _timed_allreduces(f"tcp://127.0.0.1:{port}", rank, nbytes, repeats)
    if rank == 0:
        out.put(seconds)


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


def gloo_latency_us(repeats: int = 300) -> float:
    """Latency per message of gloo between 2 processes on this machine, measured: the mean time of an
    all-reduce of a few values (latency-bound) over the 2(K-1) = 2 messages a 2-rank ring sends."""
    nbytes = 64
    gbps = gloo_gbps(nbytes, repeats)
    seconds_per_allreduce = nbytes * 8 / (gbps * 1e9)
    return seconds_per_allreduce / 2 * 1e6


def gloo_node(nbytes: int, repeats: int, out: str) -> None:
    """One node of the emulated-link benchmark (run by ``local/emulate_cluster.sh`` in each node, which
    sets NODE_RANK and MASTER_ADDR): plain gloo all-reduces of ``nbytes`` across the limited link;
    node 0 writes the seconds they took to ``out``."""
    rank = int(os.environ["NODE_RANK"])
    seconds = _timed_allreduces(f"tcp://{os.environ['MASTER_ADDR']}:29533", rank, nbytes, repeats)
    if rank == 0:
        Path(out).write_text(f"{seconds}\n")


def emulated_gloo_gbps(rate: str, nbytes: int, repeats: int = 5) -> float:
    """Gbit/s of a plain 2-process gloo all-reduce between two emulated nodes whose links tc limits to
    ``rate``, measured (TCP/IP and Ethernet headers, tbf's shaping and gloo's own pauses included):
    each node sends the tensor once per all-reduce, as in :func:`gloo_gbps`."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "seconds"
        cmd = ["bash", str(REPO / "local" / "emulate_cluster.sh"), "--nodes", "2", "--rate", rate, "--prefix", "apv",
               "--", sys.executable, "-m", "asr_parallel.bin.validate_scaling", "--gloo-node", str(nbytes),
               str(repeats), str(out)]
        r = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        if r.returncode != 0 or not out.is_file():
            raise SystemExit(f"ERROR: scaling validation: the gloo benchmark across emulated nodes at {rate} failed "
                             "(see above)")
        seconds = float(out.read_text())
    return repeats * nbytes * 8 / seconds / 1e9


def window_step_seconds(exp: Path, window: int, pauses: list[int] | tuple = ()) -> list[float]:
    """Seconds per step in successive windows of ``window`` steps of a finished run: wall time between
    the ``train/loss`` points of its TensorBoard log at multiples of ``window`` (choose it a multiple
    of the logging interval and of the strategy's synchronisation period, so every window holds the
    same share of synchronisations). A window in which the run paused after a step of ``pauses``
    (evaluation at an epoch's end, a checkpoint: after the step's point is logged, so in the window
    that starts at or runs over it) is left out: ``train_seconds`` leaves those pauses out too.
    Empty without such a log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = exp / "tensorboard"
    if not tb.is_dir():
        return []
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    if "train/loss" not in acc.Tags()["scalars"]:
        return []
    points = sorted((e.step, e.wall_time) for e in acc.Scalars("train/loss") if e.step % window == 0)
    return [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(points, points[1:])
            if s1 > s0 and not any(s0 <= p < s1 for p in pauses)]


def spread(values: list[float]) -> dict | None:
    """Median and 10th / 90th percentiles (nearest rank) of per-window step times: how much this shared
    machine's own pace moved during a run, against which a prediction's error can be read."""
    if len(values) < 3:
        return None
    v = sorted(values)

    def q(f):
        return v[min(len(v) - 1, max(0, round(f * (len(v) - 1))))]

    return {"windows": len(v), "median": q(0.5), "p10": q(0.1), "p90": q(0.9)}


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


_BATCHES: dict = {}  # the recipe's training batches per rank, per data directory, batch settings, ranks, steps
_EPOCH_STEPS: dict = {}  # steps of one epoch, per data directory, batch settings and ranks


def predict_run(exp: Path, compute: dict, intra_gbps: float, link_gbps: dict | None = None,
                latency_us: float = 0.0, concurrent: bool = True) -> dict:
    """Measured and predicted mean step time of one finished run. ``link_gbps``: the measured gloo
    all-reduce rate across emulated nodes per tc rate (:func:`emulated_gloo_gbps`); a rate without a
    measurement is taken at its nominal value. ``latency_us``: gloo's latency per message
    (:func:`gloo_latency_us`). ``concurrent``: ranks and pipeline parts timed in processes of their
    own, all at once (``predict_scaling.measure_concurrently``), else in turns in this process."""
    from asr_parallel.bin.predict_scaling import (epoch_steps, lockstep_factor, measure, measure_parts, measure_pipeline,
                                                  measure_ranks, pipeline_lockstep, step_batches, workload)
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
    steps, k, nodes = summary["steps"], summary["world_size"], summary.get("nodes", 1)
    strategy = {"name": summary["strategy"]["name"], **dataclasses.asdict(parse_strategy(summary["strategy"]))}
    pipeline = strategy["name"] in ("pipelined_bp", "gpipe", "one_f_one_b")
    streams = 1 if pipeline else k  # data-parallel ranks each draw their own batches; a pipeline draws one stream
    # the batches the run met: those of the first epoch, or of its first steps when it was shorter
    ekey = (cfg.data_dir, cfg.train.max_duration, cfg.train.num_buckets, cfg.train.seed, streams)
    if ekey not in _EPOCH_STEPS:
        _EPOCH_STEPS[ekey] = epoch_steps(cfg, streams)
    within = min(steps, _EPOCH_STEPS[ekey] or steps)
    bkey = ekey + (within,)
    key = ("whole", cfg.model.name, threads, bkey)  # compute inputs per model, threads and batch set

    def batches():  # the compute inputs are timed on the recipe's own batches, read once
        if bkey not in _BATCHES:
            _BATCHES[bkey] = step_batches(cfg, streams, within=within)
        return _BATCHES[bkey]

    if key not in compute:
        torch.set_num_threads(threads)
        if batches():  # every rank's batches at the same steps, timed in turns
            fwd, bwd, upd, times = measure_ranks(cfg, batches()[0], concurrent=concurrent, threads=threads)
            compute[key] = (fwd, bwd, upd, lockstep_factor(times))
        else:
            compute[key] = measure(cfg, steps=5) + (1.0,)
    fwd, bwd, upd, lockstep = compute[key]
    work = workload(cfg, fwd, bwd, summary["frames_per_rank"] / steps, upd)
    work.lockstep = lockstep
    from asr_parallel.train.data import loader_workers

    # the training thread makes its own batches (the runs checked here are on CPU ranks)
    if loader_workers(cfg.train.num_workers, torch.device("cpu")) == 0 and batches():
        work.load_s = batches()[1]
    work.bucket_mb = strategy.get("bucket_cap_mb") or work.bucket_mb
    work.buckets = (summary.get("strategy_figures") or {}).get("ddp_bucket_bytes")  # what DDP really built
    if strategy["name"] == "pipelined_bp" and k > 1:  # the run's own cut, part by part
        balance, bounds = strategy.get("balance", "flops"), tuple(strategy.get("boundaries") or ())
        pkey = ("parts", cfg.model.name, threads, bkey, k, balance, bounds)
        if pkey not in compute:
            torch.set_num_threads(threads)
            pbatches = batches()[0][0] if batches() else None
            if concurrent:  # a plain pipelined-BP loop, its parts at once in processes of their own
                got = measure_pipeline(cfg, k, balance, list(bounds) or None, batches=pbatches, threads=threads)
                compute[pkey] = (got["work_s_per_frame"], got["update_s"], 1.0, got["tick_s"], got["frames_per_tick"])
            else:
                part_times: list = []
                got = measure_parts(cfg, k, balance, list(bounds) or None, batches=pbatches, per_batch=part_times)
                compute[pkey] = got + (pipeline_lockstep(part_times), None, None)
        work.part_s_per_frame, work.part_update_s, work.lockstep, work.tick_s, work.tick_frames = compute[pkey]
        work.tick_gbps = intra_gbps
    # per-node rates: the slowest link paces every collective; each at its measured gloo rate if known
    link_gbps = link_gbps or {}
    rates = summary["link_rate"].split(",") if nodes > 1 else []
    inter = min(link_gbps.get(r, parse_rate_gbps(r)) for r in rates) if rates else intra_gbps
    measured_link = bool(rates) and all(r in link_gbps for r in rates)
    # the all-reduce rates were measured on 16 MiB, their messages' latency included; the latency per
    # message enters only pipelined BP's small per-tick exchange (where the tick is not measured)
    cluster = Cluster(workers_per_node=max(1, k // nodes), nodes=nodes, intra_gbps=intra_gbps, inter_gbps=inter,
                      latency_us=latency_us if pipeline else 0.0)
    pred = mean_step_time(strategy, k, cluster, work, steps, overlap=strategy["name"] == "sync_sgd",
                          epoch_steps=_EPOCH_STEPS[ekey], checkpoint_every=cfg.train.checkpoint_every_steps)
    measured = summary["train_seconds"] / steps
    window = math.lcm(cfg.train.log_every_steps, int(strategy.get("sync_period", 1) or 1))
    every = cfg.train.checkpoint_every_steps
    pauses = [h["step"] for h in summary.get("history", []) if "step" in h] + \
        (list(range(every, steps + 1, every)) if every else [])
    windows = spread(window_step_seconds(exp, window, pauses))
    return {"run": exp.name, "exp_dir": str(exp), "strategy": strategy["name"], "ranks": k, "nodes": nodes,
            "link": (f"{summary['link_rate']} ({inter:.3f}gbit {'gloo, measured' if measured_link else 'nominal'})"
                     if nodes > 1 else f"{intra_gbps:.2f}gbit (gloo, one machine)"),
            "threads_per_rank": threads, "steps": steps, "frames_per_step": round(work.frames_per_step, 1),
            "bytes_sent_per_rank": summary["bytes_sent_per_rank"], "measured_step_s": measured,
            "predicted_step_s": pred["step_s"], "predicted_compute_s": pred["compute_s"],
            "predicted_comm_s": pred["comm_s"],
            "error_percent": round(100 * (pred["step_s"] - measured) / measured, 1),
            "window_steps": window, "window_step_s": windows}


def markdown(rows: list[dict], compute: dict, intra_gbps: float, link_gbps: dict | None = None,
             latency_us: float = 0.0, concurrent: bool = True) -> str:
    whole = {k: v for k, v in compute.items() if k[0] == "whole"}
    parts = {k: v for k, v in compute.items() if k[0] == "parts"}
    inputs = ["; ".join(f"{m} at {t} thread(s), seed {b[3]}'s batches of {b[4]} rank(s), first {b[5]} steps: "
                        f"{f * 1e6:.1f} + "
                        f"{bw * 1e6:.1f} us per frame (forward + backward), {u * 1e3:.1f} ms per update"
                        + (f", slowest rank's step {ls:.3f} x the mean rank's" if b[4] > 1 else "")
                        for (_, m, t, b), (f, bw, u, ls) in sorted(whole.items(), key=str))]
    inputs += [f"{m} at {t} thread(s), seed {b[3]}'s batches (first {b[5]} steps), cut into {k} parts ({bal}): a "
               "pipelined-BP tick "
               + " / ".join(f"{w * 1e6:.1f} us per frame + {u * 1e3:.1f} ms" for w, u in zip(v[0], v[1]))
               + (f" per part; a plain pipelined-BP loop's tick {v[3] * 1e3:.1f} ms on {v[4]:.0f} frames "
                  "(parts at once, gloo between them)"
                  if v[3] else f" per part, a tick {v[2]:.3f} x the slowest part's mean")
               for (_, m, t, b, k, bal, _), v in sorted(parts.items(), key=str)]
    timed_on = [f"{len(b[0]) - 1} steps of {ranks} rank(s) of {d}, seed {seed}, within its first {within} "
                f"({sum(int(x[1].sum()) for r in b for x in r[1:]) / sum(len(r) - 1 for r in b):.0f} frames per batch "
                f"on average; making one took {load * 1e3:.1f} ms)" for (d, _, _, seed, ranks, within), (b, load) in
                ((k, v) for k, v in _BATCHES.items() if v)]
    inputs.append("compute timed on the recipe's training batches at steps spread over the first epoch's steps "
                  "that the run met, after one to warm up: " + ", ".join(timed_on) if timed_on
                  else "compute timed on synthetic batches (no prepared data)")
    inputs.append("ranks (pipeline parts) timed " + ("each in a fresh process of its own, all at once, steps (ticks) "
                                                    "begun together" if concurrent else "in turns in one process"))
    inputs.append(f"gloo all-reduce between 2 processes of this machine: {intra_gbps:.2f} Gbit/s, "
                  f"{latency_us:.0f} us per message (a 64-byte all-reduce over 2 messages)")
    inputs += [f"between 2 emulated nodes limited to {r}: {g:.3f} Gbit/s" for r, g in sorted((link_gbps or {}).items())]
    lines = ["Inputs measured here: " + "; ".join(inputs) + ".", "",
             "| run | strategy | ranks | nodes | link | steps | frames/step | measured s/step (train_seconds / steps) "
             "| predicted s/step (compute + comm) | error | machine's pace within the run: s/step per window, "
             "median (p10-p90) |", "|" + "---|" * 11]
    for r in rows:
        w = r.get("window_step_s")
        pace = (f"{w['median']:.3f} ({w['p10']:.3f}-{w['p90']:.3f}), {w['windows']} windows of {r['window_steps']} steps"
                if w else "-")
        lines.append(f"| {r['run']} | {r['strategy']} | {r['ranks']} | {r['nodes']} | {r['link']} | {r['steps']} "
                     f"| {r['frames_per_step']:.0f} | {r['measured_step_s']:.3f} "
                     f"| {r['predicted_step_s']:.3f} ({r['predicted_compute_s']:.3f} + {r['predicted_comm_s']:.3f}) "
                     f"| {r['error_percent']:+.1f}% | {pace} |")
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
    p.add_argument("--no-link-benchmark", action="store_true",
                   help="take emulated links at their nominal tc rate instead of measuring a gloo all-reduce across them")
    p.add_argument("--in-turns", action="store_true",
                   help="time the ranks' (parts') work in turns in one process, not each in a process of its own at once")
    p.add_argument("--gloo-node", nargs=3, metavar=("NBYTES", "REPEATS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.gloo_node:  # one node of emulated_gloo_gbps's benchmark
        gloo_node(int(args.gloo_node[0]), int(args.gloo_node[1]), args.gloo_node[2])
        return
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
    latency = gloo_latency_us()
    link_gbps: dict = {}
    if os.geteuid() == 0 and not args.no_link_benchmark:
        for d in dirs:
            try:
                summary = json.loads((d / "train_summary.json").read_text())
            except (OSError, ValueError):
                continue
            if summary.get("nodes", 1) > 1:
                for r in summary["link_rate"].split(","):
                    if r not in link_gbps:
                        link_gbps[r] = emulated_gloo_gbps(r, 16 * 2**20)
    compute: dict = {}
    rows = []
    for d in dirs:
        try:
            rows.append(predict_run(d, compute, intra, link_gbps, latency, concurrent=not args.in_turns))
        except (OSError, ValueError, KeyError) as e:
            skipped.append(f"{d}: {e}")
    table = markdown(rows, compute, intra, link_gbps, latency, not args.in_turns)
    if skipped:
        table += "\n\nLeft out: " + "; ".join(skipped) + "."
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "validation.md", table + "\n")
    atomic_write_json(out / "validation.json", {
        "intra_gbps": intra, "latency_us": latency, "concurrent": not args.in_turns,
        "emulated_link_gloo_gbps": link_gbps,
        "compute_s_per_frame": [{"model": m, "threads": t, "batches_seed": b[3], "batch_ranks": b[4],
                                 "batches_within_steps": b[5], "forward": f,
                                 "backward": bw, "update_per_step": u, "lockstep": ls}
                                for (kind, m, t, b), (f, bw, u, ls) in ((k, v) for k, v in compute.items()
                                                                        if k[0] == "whole")],
        "pipelined_bp_parts": [{"model": k[1], "threads": k[2], "batches_seed": k[3][3], "batches_within_steps": k[3][5],
                                "parts": k[4], "balance": k[5],
                                "boundaries": list(k[6]), "tick_s_per_frame": v[0], "update_s": v[1],
                                "lockstep": v[2], "bare_loop_tick_s": v[3], "bare_loop_frames_per_tick": v[4]}
                               for k, v in compute.items() if k[0] == "parts"],
        "runs": rows, "left_out": skipped})
    print(table)
    print(f"written: {out}/validation.md, validation.json")


if __name__ == "__main__":
    main()
