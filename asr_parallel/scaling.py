"""Scaling predictor: step time and speed-up over one worker per strategy, for K = 1 ... 64 workers,
from measured compute time per frame, the model's size and a cluster description, with the cost
formulas of ALGORITHMS.md (K workers, P parameters, b bytes per value, tau steps per synchronisation).

Model of one step of a worker (weak scaling: every worker keeps its own batch of B frames):

* compute: B * (t_forward + t_backward) seconds (measured per frame on the target device) plus the
  update ``update_s``: gradient clipping and the optimiser step, per step, measured too, plus
  ``load_s``, the time to make the step's batch where the training thread makes it (measured);
* a ring all-reduce of n values over K workers sends 2(K-1)/K * n * b bytes per worker; it runs at
  the slowest link the ring crosses: ``intra_gbps`` inside a node, ``inter_gbps`` once the K workers
  span several nodes (workers fill nodes of ``workers_per_node``), plus ``latency_us`` per message
  (2(K-1) messages per ring);
* ``sync_sgd``: compute + one all-reduce of P per step; the ranks wait for each other every step, so
  the compute is the slowest rank's (``Workload.lockstep``: measured on the ranks' own batches). With ``overlap``, as torch DDP does, the
  gradients go in buckets each all-reduced once its gradients are ready: everything but the last
  bucket (the first layers, ready at the end of the backward pass) can hide behind the backward
  pass, so max(ring(last bucket), ring(P) - B t_backward) is left exposed. The buckets are those DDP
  really built (``Workload.buckets``, read from a run's summary, ``ddp_bucket_bytes``), or else
  torch's default layout (a first bucket of 1 MiB, then ``bucket_mb``);
* ``model_averaging``, ``bmuf``, ``easgd``: compute + one all-reduce of P every tau steps;
* ``hierarchical``: a ring of the G workers of a node every step (intra link) and, every tau steps,
  G rings of N = K / G workers (one per position in the node) sharing each node's inter-node link;
* ``pipelined_bp``: the model cut into S = K balanced parts, one minibatch per clock tick: B(2 t_f + t_b)/K
  (+ update_s / K) per tick (the parts before the last recompute their forward pass in the backward pass, as
  ``strategies/pipelined_bp.py`` does, and the slowest part sets the clock) plus the activation and its
  gradient crossing a boundary (``activation_values_per_frame`` values per input frame, each way; the
  two go in opposite directions in the same tick, as non-blocking sends, so on full-duplex links one
  way's time is paid), plus the tick's exchange of figures (one all-reduce of a few values over the
  parts: 2(K-1) message latencies, ``latency_us``, measured). With
  the parts measured one by one for the run's own cut (``Workload.part_s_per_frame``,
  ``part_update_s``) the clock is the slowest part's measured tick instead of the balanced estimate;
  with a plain pipelined-BP loop's tick measured on one machine (``Workload.tick_s``: the parts at
  once, in processes of their own, with their sends, receives and per-tick exchange, at
  ``tick_gbps`` between them) that tick is the clock, and a slower link adds only the activation's
  extra transfer time;
* ``gpipe``/``one_f_one_b``: M micro-batches over S = K parts: (M + S - 1) slots of B(t_f+t_b)/(K M)
  (+ update_s / K) plus the micro-batch transfers; the same minibatch as one worker, so no data-parallel gain.

Speed-up: frames per second of K workers over that of one (data parallel: K B frames per step;
pipelines: B frames per step). All figures are estimates; ``asr_parallel.bin.validate_scaling``
compares them with runs measured here.

``mean_step_time`` averages over a run of n steps; for pipelined BP it adds the 2(S-1) drain ticks
of every epoch end, checkpoint and the run's end, which are not steps. For the periodic strategies: the broadcast of
rank 0's model at the start (and, with fairseq's ``local_broadcast`` warm-up, after W steps), W
synchronous steps with a ``sync`` warm-up, and (n - W) // tau all-reduces of the model: the events
the cost model (``strategies/cost.py``) counts. A broadcast is timed as one ring all-reduce of the
model (2(K-1)/K P b each way on a ring; a flat broadcast from the root sends (K-1) P b: the same for
K = 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Cluster:
    workers_per_node: int = 8
    nodes: int = 8
    intra_gbps: float = 100.0  # link inside a node, Gbit/s
    inter_gbps: float = 10.0  # link between nodes, Gbit/s (per node)
    latency_us: float = 0.0  # per message


@dataclass
class Workload:
    params: int  # P
    frames_per_step: float  # B, per worker
    forward_s_per_frame: float
    backward_s_per_frame: float
    bytes_per_value: int = 4
    activation_values_per_frame: float = 0.0  # at a pipeline cut, per input frame (width x frame-rate ratio)
    max_stages: int = 1_000_000  # pipelines cannot cut the model into more parts than it has stages
    update_s: float = 0.0  # per step: gradient clipping and optimiser step of the whole model
    load_s: float = 0.0  # per step and rank: making the batch (reading, decoding, collating features)
    bucket_mb: float = 25.0  # DDP's gradient bucket size (after a first bucket of 1 MiB)
    buckets: list | None = None  # the buckets DDP built, bytes, in all-reduce order (a run's ddp_bucket_bytes)
    # pipelined_bp with the cut into len(part_s_per_frame) parts, measured part by part
    # (predict_scaling.measure_parts): a clock tick's compute per input frame, and the update, of each part
    part_s_per_frame: list | None = None
    part_update_s: list | None = None
    # ranks in lock-step (synchronous SGD) take the slowest rank's step: the mean over steps of the
    # slowest rank's compute over the mean rank's (predict_scaling.lockstep_factor, measured)
    lockstep: float = 1.0
    # pipelined_bp with len(part_s_per_frame) parts on one machine: a measured clock tick of a plain
    # pipelined-BP loop there (predict_scaling.measure_pipeline: parts at once in processes of their
    # own, their sends, receives and exchange over gloo included), at ``tick_gbps`` between the parts
    tick_s: float | None = None
    tick_frames: float | None = None  # the measured ticks' frames per batch (the tick scales to frames_per_step)
    tick_gbps: float | None = None


PERIODIC = ("model_averaging", "bmuf", "easgd")  # one all-reduce of the model every tau steps

# torch DDP puts the first gradients ready (the last layers) into a bucket of 1 MiB
# (torch.distributed._DEFAULT_FIRST_BUCKET_BYTES), the rest into buckets of bucket_cap_mb.
FIRST_BUCKET_BYTES = 2**20


def last_bucket_bytes(total: float, bucket_mb: float) -> float:
    """Bytes of DDP's last gradient bucket (the first layers, all-reduced after the backward pass)."""
    first = min(total, FIRST_BUCKET_BYTES)
    rest = total - first
    if rest <= 0:
        return first
    cap = bucket_mb * 2**20
    return rest - (math.ceil(rest / cap) - 1) * cap


def ring_seconds(values: float, k: int, gbps: float, b: int, latency_us: float = 0.0, share: int = 1) -> float:
    """Time of a ring all-reduce of ``values`` over ``k`` workers on a link of ``gbps`` (``share`` rings
    using the same link at once)."""
    if k <= 1:
        return 0.0
    nbytes = 2 * (k - 1) / k * values * b
    return share * nbytes * 8 / (gbps * 1e9) + 2 * (k - 1) * latency_us * 1e-6


def exchange_values(parts: int) -> int:
    """Values (float64) of pipelined BP's per-tick exchange of figures over ``parts`` parts (loss,
    gradient norm and per-part counters: ``strategies/pipeline.py``'s exchange)."""
    return 3 + 5 * parts + 2 * (parts - 1)


def step_time(strategy: dict, k: int, cluster: Cluster, work: Workload, overlap: bool = False) -> dict:
    """Seconds of one step for ``k`` workers: compute, communication and total, and frames per step."""
    name = strategy["name"]
    b = work.bytes_per_value
    compute = work.frames_per_step * (work.forward_s_per_frame + work.backward_s_per_frame) + work.update_s \
        + work.load_s
    nodes = math.ceil(k / cluster.workers_per_node)
    link = cluster.inter_gbps if nodes > 1 else cluster.intra_gbps
    tau = strategy.get("sync_period", 1)
    frames = work.frames_per_step * k
    pipeline = name in ("pipelined_bp", "gpipe", "one_f_one_b")
    if name == "single" or (k == 1 and not pipeline):
        comm = 0.0
    elif name == "sync_sgd":
        compute = (compute - work.load_s) * work.lockstep + work.load_s
        comm = ring_seconds(work.params, k, link, b, cluster.latency_us)
        if overlap:
            last_bytes = work.buckets[-1] if work.buckets else last_bucket_bytes(work.params * b, work.bucket_mb)
            last = ring_seconds(last_bytes / b, k, link, b, cluster.latency_us)
            comm = max(last, comm - work.frames_per_step * work.backward_s_per_frame)
    elif name in PERIODIC:
        comm = ring_seconds(work.params, k, link, b, cluster.latency_us) / tau
    elif name == "hierarchical":
        g = min(k, strategy.get("group_size") or cluster.workers_per_node)
        n = max(1, k // g)
        comm = ring_seconds(work.params, g, cluster.intra_gbps, b, cluster.latency_us)
        comm += ring_seconds(work.params, n, cluster.inter_gbps, b, cluster.latency_us, share=g) / tau
    elif pipeline:
        frames = work.frames_per_step
        act = work.frames_per_step * work.activation_values_per_frame * b * 8 / (link * 1e9)  # one way
        if name == "pipelined_bp":
            # every part reads every batch (one data stream): each pays the loading
            measured_tick = bool(work.tick_s) and bool(work.part_s_per_frame) and len(work.part_s_per_frame) == k
            if measured_tick:  # a plain loop's tick as measured, its transfers at tick_gbps included,
                # in proportion to the frames of a step against those of the measured ticks
                compute = work.tick_s * work.frames_per_step / (work.tick_frames or work.frames_per_step) + work.load_s
            elif work.part_s_per_frame and len(work.part_s_per_frame) == k:  # the parts as measured
                compute = max(work.frames_per_step * t + u for t, u in zip(work.part_s_per_frame, work.part_update_s)) \
                    * work.lockstep + work.load_s  # lockstep: each tick lasts its slowest part's work
            elif k > 1:
                compute = (work.frames_per_step * (2 * work.forward_s_per_frame + work.backward_s_per_frame)
                           + work.update_s) / k + work.load_s
            # the activation goes down and the gradient of an earlier batch comes up in the same tick,
            # as sends that do not block: on full-duplex links the two directions do not queue; and
            # every tick ends with the exchange of its figures, an all-reduce of a few values over
            # the parts (latency-bound: 2(K-1) messages)
            comm = act + ring_seconds(exchange_values(k), k, link, 8, cluster.latency_us) if k > 1 else 0.0
            if measured_tick:  # what the measured tick holds already: the transfer at its own rate
                comm = max(0.0, act - work.frames_per_step * work.activation_values_per_frame * b * 8
                           / (work.tick_gbps * 1e9)) if work.tick_gbps else act
        else:
            m = strategy.get("microbatches", 4)
            slots = m + k - 1
            compute = slots * (compute - work.update_s - work.load_s) / (k * m) + work.update_s / k + work.load_s
            comm = slots * 2 * act / m if k > 1 else 0.0
    else:
        raise ValueError(f"no scaling model for strategy '{name}'")
    total = compute + comm
    return {"compute_s": compute, "comm_s": comm, "step_s": total, "frames": frames,
            "frames_per_second": frames / total if total > 0 else float("inf")}


def predict(strategies: list[dict], ks: list[int], cluster: Cluster, work: Workload, overlap: bool = False) -> list[dict]:
    rows = []
    for s in strategies:
        base = step_time(s, 1, cluster, work, overlap)["frames_per_second"]
        for k in ks:
            if s["name"] in ("pipelined_bp", "gpipe", "one_f_one_b") and k > work.max_stages:
                continue
            t = step_time(s, k, cluster, work, overlap)
            rows.append({"strategy": s["name"], "params": {kk: v for kk, v in s.items() if kk != "name"}, "workers": k,
                         **{kk: round(v, 6) for kk, v in t.items()},
                         "speedup": t["frames_per_second"] / base, "efficiency": t["frames_per_second"] / base / k})
    return rows



def with_defaults(strategy: dict) -> dict:
    """The strategy section with every parameter, defaults filled in from the strategy's ``Params``."""
    import dataclasses

    from asr_parallel.strategies import parse_strategy

    return {"name": strategy["name"], **dataclasses.asdict(parse_strategy(strategy))}


def comm_events(strategy: dict, steps: int) -> dict:
    """What a periodic strategy sends in a run of ``steps`` steps: synchronous warm-up steps, model
    all-reduces and broadcasts of the model (the cost model's events)."""
    from asr_parallel.strategies.cost import sync_count

    s = with_defaults(strategy)
    w, mode = int(s.get("warmup_steps", 0)), s.get("warmup", "sync")
    warm = min(steps, w) if w and mode == "sync" else 0
    broadcasts = 1 + (1 if w and mode == "local_broadcast" and steps >= w else 0)
    return {"sync_steps": warm, "allreduces": sync_count(steps, int(s["sync_period"]), w), "broadcasts": broadcasts}


def syncs_in_run(strategy: dict, steps: int) -> int:
    """All-reduces of the whole model (or of its gradients, in a synchronous warm-up) in a run of
    ``steps`` steps of a periodic strategy."""
    e = comm_events(strategy, steps)
    return e["sync_steps"] + e["allreduces"]


def pipeline_flushes(steps: int, epoch_steps: int | None, checkpoint_every: int = 0) -> int:
    """How often a run of ``steps`` steps drains pipelined BP's pipeline: at every checkpoint (every
    ``checkpoint_every`` steps), every epoch's end (every ``epoch_steps``) and the run's end, once
    where they fall on the same step (``strategies/pipelined_bp.py``: each drain is 2(S-1) ticks
    that are not steps)."""
    points = {steps} if steps > 0 else set()
    for every in (checkpoint_every, epoch_steps or 0):
        if every > 0:
            points |= set(range(every, steps + 1, every))
    return len(points)


def mean_step_time(strategy: dict, k: int, cluster: Cluster, work: Workload, steps: int, overlap: bool = False,
                   epoch_steps: int | None = None, checkpoint_every: int = 0) -> dict:
    """:func:`step_time` averaged over a run of ``steps`` steps: periodic strategies pay the warm-up,
    broadcasts and all-reduces of :func:`comm_events`; pipelined BP pays the drain ticks of
    :func:`pipeline_flushes` (each a full tick: an upper bound, the last drain ticks have less work)
    with ``epoch_steps`` (steps of an epoch) and ``checkpoint_every``."""
    t = step_time(strategy, k, cluster, work, overlap)
    if strategy["name"] == "pipelined_bp" and k > 1 and steps > 0:
        ticks = steps + 2 * (k - 1) * pipeline_flushes(steps, epoch_steps, checkpoint_every)
        t["compute_s"] *= ticks / steps
        t["comm_s"] *= ticks / steps
        t["step_s"] = t["compute_s"] + t["comm_s"]
        t["frames_per_second"] = t["frames"] / t["step_s"]
    if strategy["name"] in PERIODIC and steps > 0:
        e = comm_events(strategy, steps)
        ring = step_time({"name": "sync_sgd"}, k, cluster, work)["comm_s"]
        warm = step_time({"name": "sync_sgd"}, k, cluster, work, overlap=True)["comm_s"]  # warm-up: DDP
        t["comm_s"] = (e["sync_steps"] * warm + (e["allreduces"] + e["broadcasts"]) * ring) / steps
        if k > 1:  # synchronous warm-up steps wait for the slowest rank
            t["compute_s"] += e["sync_steps"] * (work.lockstep - 1) * (t["compute_s"] - work.load_s) / steps
        t["step_s"] = t["compute_s"] + t["comm_s"]
        t["frames_per_second"] = t["frames"] / t["step_s"]
    return t


_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
               "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12}


def parse_rate_gbps(rate: str) -> float:
    """A tc rate (``500mbit``, ``1gbit``; tc's ``bps`` units are bytes per second) in Gbit/s."""
    import re

    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]+)\s*", str(rate))
    if not m or m.group(2).lower() not in _RATE_UNITS:
        raise ValueError(f"link rate '{rate}' is not a tc rate such as 500mbit or 1gbit "
                         f"(units: {', '.join(_RATE_UNITS)})")
    return float(m.group(1)) * _RATE_UNITS[m.group(2).lower()] / 1e9
