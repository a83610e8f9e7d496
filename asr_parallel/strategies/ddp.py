"""torch's DistributedDataParallel with every call counted and the loss averaged over all ranks.

Used by ``sync_sgd``, by the synchronous warm-up of the periodic strategies and inside the groups of
``hierarchical``. DDP keeps its own bucketing: by default (``bucket_cap_mb`` 0) torch's, whose first
bucket holds 1 MiB of the gradients produced last in the forward pass (the first ready in backward)
so its all-reduce starts early, the rest in buckets of up to 25 MiB; gradients are views into the
buckets (``gradient_as_bucket_view``). The buckets DDP really built (after its rebuild at the second
step) are read back from DDP (:func:`bucket_bytes`), for the run summary and the scaling model.

The communication hook (:func:`_hook`) replaces DDP's mean with the *global* mean of the loss: the
trainer back-propagates each rank's summed loss, and every bucket's all-reduce carries two more
values, the rank's utterance count and a flag for a non-finite loss. After the all-reduce the
gradients are divided by the utterances of all ranks, so K ranks with unequal batches compute what
one process computes on their union (Chen et al. 2016 define synchronous SGD on the union minibatch);
and a non-finite loss on any rank makes the gradients NaN on every rank, so every rank decides to
skip that step from the same numbers, without a collective of its own.

Counted (label ``ddp_setup``): DDP's construction (a shape check and the broadcast of rank 0's
parameters, not its buffers, ``broadcast_buffers`` being off; the calls read from the process group's sequence number around it) and the
two broadcasts of its bucket rebuild; (label given by the caller) every bucket's all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from asr_parallel.strategies.base import CommCounter, process_group_calls


@dataclass
class HookState:
    comm: CommCounter
    group: object
    label: str
    world: int
    weight: torch.Tensor | None = None  # (utterances, non-finite loss) of this rank's step
    rebuilt: bool = False
    compression: object = None  # asr_parallel.strategies.compression.CompressionState (sync_sgd)


def ddp_wrap(model: nn.Module, dist, comm: CommCounter, group=None, label: str = "gradients",
             bucket_cap_mb: float = 0.0, find_unused_parameters: bool = False, compression=None):
    """DDP over ``group`` (None: all ranks) with the counting, globally averaging hook; returns
    (the DDP module, its hook state). ``compression``: a
    :class:`~asr_parallel.strategies.compression.CompressionState` (``sync_sgd``)."""
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel as DDP

    world = tdist.get_world_size(group)
    before = process_group_calls([group])
    ddp = DDP(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
              process_group=group, bucket_cap_mb=bucket_cap_mb or None, broadcast_buffers=False,
              find_unused_parameters=find_unused_parameters, gradient_as_bucket_view=True)
    calls = process_group_calls([group]) - before
    # DDP's construction broadcasts the parameters only: with broadcast_buffers off, torch's
    # _sync_module_states leaves the buffers out
    nbytes = sum(t.numel() * t.element_size() for t in model.parameters())
    is_root = tdist.get_rank() == (tdist.get_global_rank(group, 0) if group is not None else 0)
    comm.add(nbytes * (world - 1) if is_root else 0, calls, "ddp_setup")
    if not is_root:
        comm.bytes_received += nbytes
    state = HookState(comm, group, label, world, compression=compression)
    ddp.register_comm_hook(state, _hook)
    return ddp, state


def bucket_bytes(ddp) -> list[int]:
    """The gradient buckets DDP built, in bytes, in the order they are all-reduced (after its rebuild
    at the second step; before it, the layout of the first step), read from DDP's reducer. (DDP's
    logging data records the rebuilt layout only at the next synchronised forward pass, which a
    synchronous warm-up followed by ``no_sync`` steps never has.)"""
    reducer = getattr(ddp, "reducer", None)
    if reducer is not None and hasattr(reducer, "_get_zeros_like_grad_buckets"):
        return [b.buffer().numel() * b.buffer().element_size() for b in reducer._get_zeros_like_grad_buckets()]
    data = ddp._get_ddp_logging_data()
    sizes = data.get("rebuilt_bucket_sizes") or data.get("bucket_sizes") or ""
    return [int(s) for s in str(sizes).split(",") if s.strip()]


def note_rebuild(ddp, state: HookState) -> None:
    """Count DDP's bucket rebuild (two broadcasts of the bucket layout from rank 0, in the forward pass
    of the first step after the first synchronised one, with or without ``no_sync``) once it has
    happened; call after every backward pass through ``ddp``."""
    if state.rebuilt or state.world <= 1:
        return
    if getattr(ddp, "_has_rebuilt_buckets", False):
        state.rebuilt = True
        n_params = sum(1 for p in ddp.module.parameters() if p.requires_grad)
        state.comm.control(2, 8 * (n_params + 2 * len(bucket_bytes(ddp))), "ddp_setup")


def _hook(state: HookState, bucket):
    import torch.distributed as tdist

    if state.compression is not None and state.compression.compressing():
        from asr_parallel.strategies.compression import compressed_hook

        return compressed_hook(state, bucket)
    buf = bucket.buffer()
    if state.weight is None:  # no utterance count given: the mean over ranks, as DDP's default
        state.comm.all_reduce(buf.numel(), buf.element_size(), state.world, state.label)
        buf.div_(state.world)
        fut = tdist.all_reduce(buf, group=state.group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])
    flat = torch.cat([buf, state.weight.to(device=buf.device, dtype=buf.dtype)])
    state.comm.all_reduce(flat.numel(), flat.element_size(), state.world, state.label)
    fut = tdist.all_reduce(flat, group=state.group, async_op=True).get_future()

    def done(f):  # one pass into the bucket: no temporary of the bucket's size
        v = f.value()[0]
        torch.div(v[:-2], v[-2], out=buf)
        buf.masked_fill_(v[-1] > 0, float("nan"))  # a tensor condition: no wait for the device
        return buf

    return fut.then(done)


def set_weight(state: HookState, utterances: int, loss: torch.Tensor) -> None:
    """This rank's utterance count and non-finite-loss flag for the step's buckets; a compressing step
    sums them over the ranks first (one all-reduce of 2 values), as its buckets cannot carry them."""
    flag = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
    state.weight = torch.cat([torch.full((1,), float(utterances), device=flag.device), flag])
    cs = state.compression
    if cs is not None:
        cs.begin_step()
        if cs.compressing():
            import torch.distributed as tdist

            state.comm.all_reduce(2, 4, state.world, state.label)
            cs.total = state.weight.clone()
            tdist.all_reduce(cs.total, group=state.group)
