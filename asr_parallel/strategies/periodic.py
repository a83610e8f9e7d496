"""Shared machinery of the strategies whose ranks train locally and synchronise every ``tau`` steps.

Model averaging, BMUF and EASGD (and the outer level of ``hierarchical``) differ only in what they
compute at a synchronisation; this base class holds what they share:

* the schedule: optional synchronous warm-up (``warmup_steps`` steps whose gradients are averaged
  across the group every step, i.e. synchronous SGD), then a synchronisation after every
  ``sync_period`` local steps: after step s when s > W and (s - W) % tau == 0;
* the process group the strategy synchronises over (all ranks, or a subgroup for ``hierarchical``);
* flattening parameters and floating-point buffers (batch-norm statistics, which Kaldi's model
  averaging averages too) into one vector per collective call;
* the *global* model, a copy holding the result of the last synchronisation, which is what the
  trainer evaluates and saves per epoch (the local models differ between synchronisations).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from asr_parallel.strategies.base import DistContext, Strategy, all_reduce, group_size


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def flatten(tensors) -> torch.Tensor:
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(0)
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def unflatten_into(flat: torch.Tensor, tensors) -> None:
    """Copy consecutive slices of ``flat`` into ``tensors``, in place (storage unchanged)."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.data.copy_(flat[offset:offset + n].view_as(t))
        offset += n
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} values, the tensors {offset}")


def check_period(params) -> None:
    """Validate ``sync_period`` and ``warmup_steps`` of a strategy's parameters."""
    if params.sync_period < 1:
        raise ValueError(f"strategy.sync_period must be >= 1, got {params.sync_period}")
    if getattr(params, "warmup_steps", 0) < 0:
        raise ValueError(f"strategy.warmup_steps must be >= 0, got {params.warmup_steps}")


def float_buffers(module: nn.Module) -> list[torch.Tensor]:
    return [b for b in module.buffers() if b.is_floating_point()]


class PeriodicSync(Strategy):
    """Base class: see the module docstring. ``Params`` must have ``sync_period`` (and may have
    ``warmup_steps``)."""

    def __init__(self, params, dist: DistContext, group=None, label: str = "params"):
        super().__init__(params, dist)  # the Params checked sync_period and warmup_steps
        self.group = group  # None: all ranks
        self.label = label
        self.module: nn.Module | None = None
        self.global_model: nn.Module | None = None
        self.step = 0  # the last optimiser step seen

    # -- schedule
    @property
    def warmup_steps(self) -> int:
        return int(getattr(self.params, "warmup_steps", 0))

    @property
    def k(self) -> int:
        """Ranks in the synchronisation group."""
        return group_size(self.group)

    def is_sync_step(self, step: int) -> bool:
        w, tau = self.warmup_steps, self.params.sync_period
        return step > w and (step - w) % tau == 0

    # -- model
    def wrap_model(self, model: nn.Module) -> nn.Module:
        self.module = unwrap(model)
        self.global_model = copy.deepcopy(self.module).requires_grad_(False)
        self.init_state()
        return model

    def init_state(self) -> None:
        """Set up the strategy's state from the (identical on every rank) initial model."""

    def params_list(self) -> list[torch.Tensor]:
        return list(self.module.parameters())

    def eval_model(self, model: nn.Module) -> nn.Module:
        # During the synchronous warm-up every rank holds the same model; afterwards the global one.
        return unwrap(model) if self.step <= self.warmup_steps else self.global_model

    def set_global_from_local(self) -> None:
        self.global_model.load_state_dict(self.module.state_dict())

    # -- steps
    def after_backward(self, step: int, model: nn.Module) -> None:
        """Synchronous warm-up: average the gradients over the group (one all-reduce)."""
        if step > self.warmup_steps or self.k <= 1:
            return
        params = [p for p in self.params_list() if p.grad is not None]
        flat = flatten(p.grad for p in params)
        all_reduce(flat, self.comm, self.group, "gradients")
        flat /= self.k
        unflatten_into(flat, [p.grad for p in params])

    def after_optimizer_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.step = step
        if self.warmup_steps and step == self.warmup_steps:
            self.end_warmup()
        elif self.is_sync_step(step):
            self.synchronize(step, optimizer)

    def end_warmup(self) -> None:
        """The synchronous warm-up is over: blocks start from the (common) current model."""
        self.set_global_from_local()
        self.init_state()

    def synchronize(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        raise NotImplementedError

    def allreduce_model(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum over the group of this rank's parameters and floating buffers (one all-reduce);
        returns (summed parameters, summed buffers) as flat vectors."""
        params, bufs = self.params_list(), float_buffers(self.module)
        n = sum(p.numel() for p in params)
        flat = flatten(params + bufs)
        all_reduce(flat, self.comm, self.group, self.label)
        return flat[:n], flat[n:]

    # -- checkpoints
    def state_dict(self) -> dict:
        return {**super().state_dict(), "step": self.step, "global_model": self.global_model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.step = state["step"]
        self.global_model.load_state_dict(state["global_model"])
