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

Not modelled: DDP's set-up calls (``ddp_setup``) and the trainer's own coordination (``trainer``):
they are counted, and reported apart.
"""

from __future__ import annotations

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


def predict(section: dict, size: ModelSize, world_size: int, steps: int, local_world_size: int | None = None,
            buckets: list[int] | None = None, rank: int = 0) -> dict:
    """Predicted bytes sent by global rank ``rank`` (0: the rank that broadcasts), collective calls
    and bytes per label, for a strategy section; ``buckets``: DDP's rebuilt buckets in values."""
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

    if name == "sync_sgd":
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
