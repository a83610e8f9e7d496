"""The interface between the trainer and a parallel-training strategy.

The trainer owns data, model, optimiser, schedule, checkpoints and logging. A strategy decides how
the ranks cooperate, at one of two depths:

* around the optimiser step (``owns_step = False``): the trainer runs forward, backward and the
  optimiser step on the model ``wrap_model`` returned; the strategy acts in ``after_optimizer_step``
  (synchronous SGD does its work inside backward through DDP; model averaging, BMUF and EASGD
  average parameters every few steps);
* the whole step (``owns_step = True``): the trainer hands each batch to ``train_step``, which runs
  forward, backward and update itself (pipelines, asynchronous methods).

Every strategy counts the bytes it sends and receives at its collective calls (``comm``), keeps its
own state in ``state_dict`` (saved in every checkpoint, per rank), and names the model to evaluate
(``eval_model``: the global model for BMUF, the centre for EASGD).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class DistContext:
    """Where this process stands: rank, world size, device, and the process group (None when alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: object = None
    initialized: bool = False  # a torch.distributed process group exists (torchrun, even with one rank)

    @property
    def distributed(self) -> bool:
        return self.initialized or self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class CommCounter:
    """Bytes this rank sent and received at collective calls, and the number of calls.

    A ring all-reduce of n values of b bytes over K ranks makes each rank send and receive
    2(K-1)/K * n * b bytes (reduce-scatter, then all-gather). Calls are counted from the tensors that
    actually go through ``torch.distributed`` (their element count, element size and group size), under
    a label (``gradients``, ``params``, ``state``, ``intra``, ``inter``; for pipelines ``forward``,
    ``backward``, ``handshake``), so the cost model's prediction (:mod:`asr_parallel.strategies.cost`)
    can be checked against them.
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    calls: int = 0
    by_label: dict = field(default_factory=dict)  # label -> [bytes sent, calls]

    def all_reduce(self, numel: int, element_size: int, world_size: int, label: str = "gradients") -> None:
        """Count one ring all-reduce of ``numel`` values over ``world_size`` ranks."""
        if world_size <= 1:
            return
        nbytes = ring_allreduce_bytes(numel, element_size, world_size)
        self.add(nbytes, 1, label)
        self.bytes_received += nbytes

    def add(self, nbytes: int, calls: int, label: str) -> None:
        """Count ``calls`` sends of ``nbytes`` bytes in all under ``label``."""
        self.bytes_sent += nbytes
        self.calls += calls
        entry = self.by_label.setdefault(label, [0, 0])
        entry[0] += nbytes
        entry[1] += calls

    def state_dict(self) -> dict:
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received, "calls": self.calls,
                "by_label": {k: list(v) for k, v in self.by_label.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.bytes_sent, self.bytes_received, self.calls = state["bytes_sent"], state["bytes_received"], state["calls"]
        self.by_label = {k: list(v) for k, v in state.get("by_label", {}).items()}


def ring_allreduce_bytes(numel: int, element_size: int, world_size: int) -> int:
    """Bytes each rank sends (and receives) in a ring all-reduce: 2(K-1)/K * n * b, rounded down."""
    if world_size <= 1:
        return 0
    return 2 * (world_size - 1) * numel * element_size // world_size


def group_size(group=None) -> int:
    import torch.distributed as tdist

    return tdist.get_world_size(group) if tdist.is_initialized() else 1


def all_reduce(tensor: torch.Tensor, counter: CommCounter, group=None, label: str = "params", op=None) -> torch.Tensor:
    """``torch.distributed.all_reduce`` (sum by default) on ``tensor`` in place, counted in ``counter``."""
    import torch.distributed as tdist

    k = group_size(group)
    if k > 1:
        counter.all_reduce(tensor.numel(), tensor.element_size(), k, label)
        tdist.all_reduce(tensor, op=op if op is not None else tdist.ReduceOp.SUM, group=group)
    return tensor


@contextmanager
def counting_collectives(counter: CommCounter, label: str):
    """Count the all-reduces that library code (torch's model averagers) makes inside the block.

    ``torch.distributed.all_reduce`` is wrapped for the duration, so the count comes from the tensors
    the library really sends, not from a re-statement of its schedule.
    """
    import torch.distributed as tdist

    original = tdist.all_reduce

    def counted(tensor, op=tdist.ReduceOp.SUM, group=None, async_op=False):
        counter.all_reduce(tensor.numel(), tensor.element_size(), tdist.get_world_size(group), label)
        return original(tensor, op=op, group=group, async_op=async_op)

    tdist.all_reduce = counted
    try:
        yield counter
    finally:
        tdist.all_reduce = original


class Strategy:
    """Base class; see the module docstring."""

    name: str = ""
    owns_step: bool = False

    @dataclass
    class Params:
        pass

    def __init__(self, params, dist: DistContext):
        self.params = params
        self.dist = dist
        self.comm = CommCounter()

    # -- data: which shard of the training data this rank reads
    def data_shard(self) -> tuple[int, int]:
        return self.dist.rank, self.dist.world_size

    @property
    def replicas(self) -> int:
        """Ranks that each train on frames of their own (for frames per second): all of them for data
        parallelism, one for a pipeline (its ranks share every minibatch)."""
        return self.data_shard()[1]

    # -- model and optimiser
    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once the optimiser exists, before the schedule: may scale learning rates."""

    def eval_model(self, model: nn.Module) -> nn.Module | None:
        """The model to evaluate and save; called on every rank (pipelines gather it on rank 0)."""
        return model

    # -- step hooks (``step`` counts optimiser steps from 1; the step being taken or just taken)
    def after_backward(self, step: int, model: nn.Module) -> None:
        """Gradients are ready and not yet clipped (synchronous warm-up phases average them here)."""

    def after_optimizer_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass

    def train_step(self, batch, trainer):  # only strategies that own the step implement this
        raise NotImplementedError

    def end_of_epoch(self, trainer) -> list[dict]:
        """All batches of the epoch went in; finish the work in flight (pipelines drain). Returns the
        figures of any further steps, as :meth:`train_step` does."""
        return []

    def checkpoint_ok(self) -> bool:
        """Whether the state can be saved now (not with minibatches in flight in a pipeline)."""
        return True

    def predicted_comm(self) -> dict | None:
        """The cost model's bytes for what this strategy did, where it depends on more than the step
        count (pipelines: the batch shapes); None: the trainer asks :func:`cost.predict`."""
        return None

    def summary_figures(self) -> dict:
        """Figures for the run's summary and the comparison table (pipelines: staleness per stage)."""
        return {}

    def describe(self) -> str:
        """A line for the training log (pipelines: which stages each rank runs)."""
        return ""

    def log_scalars(self) -> dict[str, float]:
        """Strategy-specific figures for TensorBoard (rank 0), e.g. per pipeline stage."""
        return {}

    # -- checkpoints
    def state_dict(self) -> dict:
        return {"comm": self.comm.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.comm.load_state_dict(state["comm"])
