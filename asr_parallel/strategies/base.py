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
    """Bytes this rank sent and received at collective calls, and the number of calls."""

    bytes_sent: int = 0
    bytes_received: int = 0
    calls: int = 0

    def all_reduce(self, numel: int, element_size: int, world_size: int) -> None:
        """A ring all-reduce of ``numel`` values: each rank sends and receives 2(K-1)/K of them."""
        if world_size <= 1:
            return
        nbytes = 2 * (world_size - 1) * numel * element_size // world_size
        self.bytes_sent += nbytes
        self.bytes_received += nbytes
        self.calls += 1

    def state_dict(self) -> dict:
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received, "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.bytes_sent, self.bytes_received, self.calls = state["bytes_sent"], state["bytes_received"], state["calls"]


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

    # -- model
    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def eval_model(self, model: nn.Module) -> nn.Module:
        return model

    # -- step hooks
    def after_optimizer_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass

    def train_step(self, batch, trainer):  # only strategies that own the step implement this
        raise NotImplementedError

    # -- checkpoints
    def state_dict(self) -> dict:
        return {"comm": self.comm.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.comm.load_state_dict(state["comm"])
