"""Communication cost model: *modelled* bytes each rank sends per strategy, from the formulas of
ALGORITHMS.md (a formula, not a measurement; what crosses the network is read from the interfaces'
counters, :mod:`asr_parallel.utils.netstat`).

Notation as there: K ranks, P parameters, b bytes per value, tau local steps between
synchronisations, W warm-up steps. A ring all-reduce of n values makes each rank send (and receive)
2(K-1)/K * n * b bytes; a broadcast along gloo's binomial tree makes the root send n * b to
ceil(log2 K) ranks, and some others forward it (``base.broadcast_sends``). Per
strategy, over ``steps`` optimiser steps:

* ``single``: nothing.
* ``sync_sgd``: per step one all-reduce per DDP bucket of (bucket + 2) values (the 2: the rank's
  utterance count and bad-loss flag). The first step uses one bucket of all parameters; from the
  second DDP's rebuilt buckets, read from DDP (``buckets``; without them, one bucket).
  With ``compression`` (from step ``start_step`` + 1; the steps before as above) each step adds
  one all-reduce of 2 values (utterances and the non-finite flag, 4 bytes each) and, per bucket of
  n values: ``bf16``/``fp16`` an all-reduce of n values of 2 bytes; ``powersgd`` three all-reduces
  of 4-byte values: the tensors left uncompressed, all P (n_i r per compressed matrix n_i x m_i) and
  all Q (m_i r), a matrix being compressed when n_i m_i > (n_i + m_i) r min_rate (Vogels et al.
  2019); ``onebit`` an all-to-all in which this rank sends the quantised stripes of the K - 1 other
  ranks (ceil(values / 8) + 8 * columns bytes each) and a ring all-gather of the stripes padded to
  the largest, K - 1 of them sent (Seide et al. 2014); the model's columns belong to the ranks
  round robin. The layout is the last one DDP built: the first step after a restart, in DDP's
  initial layout, is predicted with it too. These need the buckets' tensors (``bucket_shapes``:
  per bucket [tensor index, shape] in bucket order, the indices those of ``model.parameters()``).
* ``model_averaging``: one broadcast of P + buffers at the start (none with a synchronous warm-up:
  DDP's construction broadcasts, counted as ``ddp_setup``), the warm-up (synchronous: W steps as
  ``sync_sgd`` and one all-reduce of the buffers at step W; ``local_broadcast``: one broadcast of
  P + buffers at step W), then after every tau-th
  local step one all-reduce of P + buffers (+ optimiser state) + 1.
* ``bmuf``, ``easgd``: as model averaging, without optimiser state.
* ``hierarchical``: per step the bucketed gradient all-reduce inside the group of G ranks; across the
  N = K / G groups the outer rule above with N in place of K (its warm-up averages gradients with a
  flat all-reduce of P), and at every outer synchronisation (and at the end of the warm-up) an
  all-reduce of the buffers inside the group.
* ``async_ps``, ``dc_asgd`` (:func:`predict_server_traffic`, a priori from the config: totals over
  all workers and over all servers, U server updates, W workers, S servers,
  ``push_every`` = ``fetch_every``, h = 80 bytes of header, 10 float64): every update is one contact of a
  worker, which sends a header and its gradient shard to each of the S servers (P values in all)
  and gets a header and the parameter shard back from each. The end adds 2W - 1 contacts when the
  last update ends an epoch (the other workers' next pushes arrive during that pause and are
  dropped, then every worker's during the stop; W - 1 when the run stops at ``train.max_steps``);
  every pause's control word, from the first server, is passed on to the other S - 1 servers by each
  worker (a header). Synchronous rounds with b = 0: U rounds of W contacts, and W at the stop.
  DC-ASGD sends what async_ps does (its copies w_bak stay on the servers). Not modelled: p != f
  (the control words' parameter sends at pauses), b > 0 and ``run_length: worker_epochs`` (how many
  gradients are dropped, or polls made, depends on timing), the shards' evaluation gathers (S > 1).

Not modelled: DDP's set-up calls (``ddp_setup``) and the trainer's own coordination (``trainer``):
they are counted, and reported apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from asr_parallel.strategies.base import broadcast_sends, ring_allreduce_bytes


@dataclass
class ModelSize:
    """What travels: parameter count, floating-point buffer values, optimiser state values, bytes each."""

    params: int
    buffers: int = 0
    optimizer_state: int = 0
    element_size: int = 4

    @classmethod
    def of(cls, model, optimizer=None) -> "ModelSize":
        from asr_parallel.strategies.model_averaging import optimizer_state_tensors
        from asr_parallel.strategies.periodic import float_buffers, unwrap

        module = unwrap(model)
        state = sum(t.numel() for t in optimizer_state_tensors(optimizer)) if optimizer is not None else 0
        return cls(params=sum(p.numel() for p in module.parameters()),
                   buffers=sum(b.numel() for b in float_buffers(module)), optimizer_state=state,
                   element_size=next(module.parameters()).element_size())


def sync_count(steps: int, sync_period: int, warmup_steps: int = 0) -> int:
    """Synchronisations in ``steps`` steps: after step s when s > W and (s - W) % tau == 0."""
    return max(0, (steps - warmup_steps) // sync_period)


def _columns(shape) -> list[int]:
    """A tensor's columns for 1-bit quantisation: d0 columns of d1 * ... values; a vector is one."""
    numel = 1
    for d in shape:
        numel *= d
    if not numel:
        return []
    return [numel // shape[0]] * shape[0] if len(shape) >= 2 else [numel]


def onebit_bucket_bytes(bucket: list, model_shapes: list, world_size: int, rank: int) -> tuple[int, int]:
    """Bytes ``rank`` sends for one bucket under 1-bit SGD: (its all-to-all, its all-gather).
    ``bucket``: [(tensor index, shape)] in bucket order; ``model_shapes``: every tensor's shape in
    model order. The model's columns, numbered in model order, belong round robin to the ranks
    (column j to rank j mod K); rank k's stripe of the bucket is the bucket's columns that belong to
    it: ceil(values / 8) bytes of signs and 8 bytes of two float32 means per column."""
    first, n = [], 0
    for shape in model_shapes:
        first.append(n)
        n += len(_columns(shape))
    values = [0] * world_size
    count = [0] * world_size
    for i, shape in bucket:
        for j, c in enumerate(_columns(shape)):
            k = (first[i] + j) % world_size
            values[k] += c
            count[k] += 1
    payload = [-(-values[k] // 8) + 8 * count[k] for k in range(world_size)]
    return sum(b for k, b in enumerate(payload) if k != rank), (world_size - 1) * max(payload)


def powersgd_bucket_values(shapes, rank: int, min_rate: float) -> tuple[int, int, int]:
    """Values of PowerSGD's three all-reduces for one bucket: (uncompressed tensors, P, Q)."""
    plain = p_vals = q_vals = 0
    for shape in shapes:
        numel = 1
        for d in shape:
            numel *= d
        n = shape[0] if len(shape) else 1
        m = numel // n if n else 0
        r = min(n, m, rank)
        if numel and n * m > (n + m) * r * min_rate:
            p_vals, q_vals = p_vals + n * r, q_vals + m * r
        else:
            plain += numel
    return plain, p_vals, q_vals


def predict(section: dict, size: ModelSize, world_size: int, steps: int, local_world_size: int | None = None,
            buckets: list[int] | None = None, rank: int = 0, bucket_shapes: list | None = None) -> dict:
    """Predicted bytes sent by global rank ``rank`` (0: the rank that broadcasts), collective calls
    and bytes per label, for a strategy section; ``buckets``: DDP's rebuilt buckets in values;
    ``bucket_shapes``: the shapes of their tensors (compressed ``sync_sgd``)."""
    from asr_parallel.strategies import parse_strategy

    name = section["name"]
    p = parse_strategy(section)
    b = size.element_size
    by_label: dict[str, list[int]] = {}
    model_state = size.params + size.buffers

    def add(label: str, numel: int, k: int, times: int, nbytes: int | None = None) -> None:
        if k <= 1 or times <= 0 or numel <= 0:
            return
        entry = by_label.setdefault(label, [0, 0])
        entry[0] += times * (ring_allreduce_bytes(numel, b, k) if nbytes is None else nbytes)
        entry[1] += times

    def bcast(label: str, numel: int, k: int, position: int) -> None:
        """``position``: this rank's place in the broadcasting group, counted from its root."""
        add(label, numel, k, 1, numel * b * broadcast_sends(position, k))

    def ddp(label: str, k: int, times: int) -> None:
        add(label, size.params + 2, k, min(1, times))
        for n in (buckets or [size.params]):
            add(label, n + 2, k, times - 1)

    def periodic(params, k: int, label: str, own_ddp: bool, position: int) -> int:
        w = getattr(params, "warmup_steps", 0)
        mode = getattr(params, "warmup", "sync")
        syncs = sync_count(steps, params.sync_period, w)
        if w and mode == "sync" and own_ddp:
            ddp("gradients", k, min(steps, w))
        else:
            bcast("broadcast", model_state, k, position)
            if w and mode == "sync":
                add("gradients", size.params, k, min(steps, w))
        if w and mode == "local_broadcast" and steps >= w:
            bcast("broadcast", model_state, k, position)
        if w and mode == "sync" and steps >= w:
            add("state", size.buffers, k, 1)  # batch-norm statistics averaged once after the warm-up
        extra = size.optimizer_state if getattr(params, "average_optimizer_state", False) else 0
        add(label, model_state + extra + 1, k, syncs)
        return syncs

    if name == "sync_sgd" and getattr(p, "compression", "none") != "none":
        plain = min(steps, p.start_step)
        ddp("gradients", world_size, plain)
        compressed = steps - plain
        k = world_size
        if k > 1 and compressed > 0:
            if bucket_shapes is None:
                raise ValueError("the bytes of compressed sync_sgd need the shapes of the buckets' tensors")
            calls, nbytes = compressed, compressed * ring_allreduce_bytes(2, 4, k)  # utterances and flag
            model_shapes = [shape for _, shape in sorted((i, tuple(sh)) for bucket in bucket_shapes
                                                         for i, sh in bucket)]
            for bucket in bucket_shapes:
                shapes = [tuple(sh) for _, sh in bucket]
                n = sum(math.prod(sh) for sh in shapes)
                if p.compression in ("bf16", "fp16"):
                    calls, nbytes = calls + compressed, nbytes + compressed * ring_allreduce_bytes(n, 2, k)
                elif p.compression == "powersgd":
                    parts = powersgd_bucket_values(shapes, p.powersgd_rank, p.powersgd_min_compression_rate)
                    calls += 3 * compressed
                    nbytes += compressed * sum(ring_allreduce_bytes(v, 4, k) for v in parts)
                else:  # onebit
                    calls += 2 * compressed
                    nbytes += compressed * sum(onebit_bucket_bytes(bucket, model_shapes, k, rank))
            entry = by_label.setdefault("gradients", [0, 0])
            entry[0] += nbytes
            entry[1] += calls
    elif name == "sync_sgd":
        ddp("gradients", world_size, steps)
    elif name in ("model_averaging", "bmuf", "easgd"):
        periodic(p, world_size, "params", True, rank)
    elif name == "hierarchical":
        g = p.group_size or local_world_size or world_size
        ddp("intra", g, steps)
        # across groups: the ranks at this rank's place in every group; the warm-up is always synchronous
        syncs = periodic(p, world_size // g, "inter", False, rank // g)
        warmed = 1 if p.warmup_steps and steps >= p.warmup_steps else 0  # buffers averaged at its end too
        add("intra", size.buffers, g, syncs + warmed)
    elif name in ("pipelined_bp", "gpipe", "one_f_one_b"):
        raise ValueError(f"the bytes of '{name}' depend on the batch shapes: see "
                         "asr_parallel.strategies.pipeline.boundary_bytes and the strategy's predicted_comm()")
    elif name != "single":
        raise ValueError(f"no cost model for strategy '{name}'")
    return {"bytes_sent": sum(v[0] for v in by_label.values()), "calls": sum(v[1] for v in by_label.values()),
            "by_label": by_label}


def predict_server_traffic(section: dict, size: ModelSize, workers: int, updates: int, pauses: int = 1,
                           ends_at_epoch: bool = True) -> dict:
    """The parameter server's traffic over a run of ``updates`` server updates, a priori (the config
    and the model's size only; formulas in the module docstring): ``{"workers": [bytes, messages],
    "servers": [bytes, messages]}`` sent by all workers together and by all servers together, with
    the ``contacts`` and ``pushes`` modelled. ``pauses``: the run's common pauses (epoch ends,
    checkpoints and the stop), whose control word each worker passes on to the other servers;
    ``ends_at_epoch``: the last update ends an epoch (a pause before the stop), else the run stops
    at ``train.max_steps``."""
    from asr_parallel.strategies import parse_strategy
    from asr_parallel.strategies.async_ps import HEADER

    p = parse_strategy(section)
    if section["name"] not in ("async_ps", "dc_asgd"):
        raise ValueError(f"no parameter server in strategy '{section['name']}'")
    if p.run_length != "updates":
        raise ValueError("run_length worker_epochs: the polls of waiting workers depend on timing; not modelled")
    if p.push_every != p.fetch_every:
        raise ValueError("push_every != fetch_every: the control words' parameter sends at pauses are not modelled")
    if p.backup_workers > 0:
        raise ValueError("backup_workers > 0: which gradients a round drops depends on timing; not modelled")
    h, s, b = HEADER * 8, p.servers, size.element_size
    if p.backup_workers == 0:  # every round: each worker pushes and fetches; the stop: one contact each
        contacts = updates * workers + workers
    else:  # every update one contact (a push and a fetch); after the last, the others' dropped pushes
        contacts = updates + (2 * workers - 1 if ends_at_epoch else workers - 1)
    pushes = contacts
    passes = pauses * workers * (s - 1)
    return {"workers": [contacts * s * h + pushes * size.params * b + passes * h, contacts * s + pushes * s + passes],
            "servers": [contacts * s * h + contacts * size.params * b, 2 * contacts * s],
            "contacts": contacts, "pushes": pushes}
