"""``sync_sgd``: synchronous mini-batch SGD with DistributedDataParallel.

Chen, Pan, Monga, Bengio, Jozefowicz, "Revisiting distributed synchronous SGD" (2016). Each of the
K ranks computes the gradient of its B/K share of the global minibatch; the gradients are averaged
by an all-reduce every step, so every rank applies the same update, exactly as one worker with the
global minibatch B would:

    g = (1/K) * sum_k g_k,     w <- w - lr * g

Traffic per rank per step with a ring all-reduce: 2 (K-1)/K * P * b bytes (P parameters of b bytes).
The all-reduce runs inside backward, bucket by bucket, overlapped with the remaining gradient
computation (torch DDP); a communication hook counts the bytes of every bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from asr_parallel.strategies.base import Strategy


class SyncSGD(Strategy):
    name = "sync_sgd"

    @dataclass
    class Params:
        bucket_cap_mb: float = 25.0  # DDP gradient bucket size
        find_unused_parameters: bool = False

    def wrap_model(self, model: nn.Module) -> nn.Module:
        if not self.dist.distributed:
            return model
        return ddp_wrap(model, self.dist, self, None, "gradients", self.params.bucket_cap_mb,
                        self.params.find_unused_parameters)

    def eval_model(self, model: nn.Module) -> nn.Module:
        return model.module if hasattr(model, "module") else model


def ddp_wrap(model: nn.Module, dist, strategy: Strategy, group, label: str, bucket_cap_mb: float = 25.0,
             find_unused_parameters: bool = False) -> nn.Module:
    """DDP over ``group`` (None: all ranks) whose gradient all-reduces are counted in ``strategy.comm``.

    Buffers (batch-norm statistics) are not broadcast from rank 0 before every forward pass: that
    traffic would escape the accounting, and rank 0's statistics, the ones evaluated, are the same
    either way.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
              process_group=group, bucket_cap_mb=bucket_cap_mb, broadcast_buffers=False,
              find_unused_parameters=find_unused_parameters)
    ddp.register_comm_hook((strategy, group, label), _counting_allreduce_hook)
    return ddp


def _counting_allreduce_hook(state, bucket):
    """DDP's default all-reduce (average over the group), counting the bytes each rank sends and receives."""
    import torch.distributed as tdist

    strategy, group, label = state
    buf = bucket.buffer()
    world = tdist.get_world_size(group)
    strategy.comm.all_reduce(buf.numel(), buf.element_size(), world, label)
    buf.div_(world)
    fut = tdist.all_reduce(buf, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])
