"""Communication cost model: bytes each rank sends per strategy, from the formulas of ALGORITHMS.md.

Notation as there: K ranks, P parameters, b bytes per value, tau local steps between
synchronisations, W steps of synchronous warm-up. A ring all-reduce of n values makes each rank send
(and receive) 2(K-1)/K * n * b bytes. Per strategy, over ``steps`` optimiser steps:

* ``single``: nothing.
* ``sync_sgd``: one gradient all-reduce of P values per step (DDP splits it into buckets; the bytes
  are the same up to rounding, the number of calls is the number of buckets).
* ``model_averaging``: W gradient all-reduces of P, then after every tau-th local step one all-reduce
  of P (parameters) and, if there are floating buffers or the optimiser state is averaged, one of
  (buffers + optimiser state).
* ``bmuf``: W gradient all-reduces of P, then one all-reduce of P + buffers per block.
* ``easgd``: one all-reduce of P + buffers every tau steps.
* ``hierarchical``: per step a gradient all-reduce of P inside the group of G ranks; across the
  N = K / G groups the outer rule above with N in place of K.

The trainer records the measured counts (:class:`~asr_parallel.strategies.base.CommCounter`) and
this prediction side by side; a test checks that they agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from asr_parallel.strategies.base import ring_allreduce_bytes


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


def predict(section: dict, size: ModelSize, world_size: int, steps: int, local_world_size: int | None = None) -> dict:
    """Predicted bytes sent per rank, collective calls and bytes per label, for a strategy section."""
    from asr_parallel.strategies import parse_strategy

    name = section["name"]
    p = parse_strategy(section)
    b = size.element_size
    by_label: dict[str, list[int]] = {}

    def add(label: str, numel: int, k: int, times: int) -> None:
        if k <= 1 or times <= 0 or numel <= 0:
            return
        entry = by_label.setdefault(label, [0, 0])
        entry[0] += times * ring_allreduce_bytes(numel, b, k)
        entry[1] += times

    def periodic(outer: str, params, k: int, label: str) -> None:
        warm = min(steps, getattr(params, "warmup_steps", 0))
        syncs = sync_count(steps, params.sync_period, getattr(params, "warmup_steps", 0))
        add("gradients", size.params, k, warm)
        if outer == "model_averaging":
            add(label, size.params, k, syncs)
            extra = size.buffers + (size.optimizer_state if getattr(params, "average_optimizer_state", False) else 0)
            add("state", extra, k, syncs)
        else:  # bmuf, easgd
            add(label, size.params + size.buffers, k, syncs)

    if name == "sync_sgd":
        add("gradients", size.params, world_size, steps)
    elif name in ("model_averaging", "bmuf", "easgd"):
        periodic(name, p, world_size, "params")
    elif name == "hierarchical":
        g = p.group_size or local_world_size or world_size
        add("intra", size.params, g, steps)
        periodic(p.outer, p, world_size // g, "inter")
    elif name in ("pipelined_bp", "gpipe", "one_f_one_b"):
        raise ValueError(f"the bytes of '{name}' depend on the batch shapes: see "
                         "asr_parallel.strategies.pipeline.boundary_bytes and the strategy's predicted_comm()")
    elif name != "single":
        raise ValueError(f"no cost model for strategy '{name}'")
    return {"bytes_sent": sum(v[0] for v in by_label.values()), "calls": sum(v[1] for v in by_label.values()),
            "by_label": by_label}
