"""``model_averaging``: tau local SGD steps on every rank, then the parameters are averaged.

Zinkevich, Weimer, Smola, Li, "Parallelized stochastic gradient descent" (NIPS 2010); Su, Chen, Xu,
"Experiments on parallel training of deep neural network using model averaging" (2015); Kaldi nnet3
(Povey, Zhang, Khudanpur, "Parallel training of DNNs with natural gradient and parameter averaging",
ICLR 2015 workshop). Every rank k runs tau steps on its own data from the common model, then

    w <- (1/K) * sum_k w_k                          (one all-reduce)

Traffic per rank per synchronisation: 2 (K-1)/K * P * b bytes, plus the same for floating-point
buffers (batch-norm statistics, averaged as Kaldi does) and, with ``average_optimizer_state``, the
optimiser's per-parameter state (Adam's two moments, SGD's momentum) in a second all-reduce.

Engine: torch's ``PeriodicModelAverager`` (period tau; its own warm-up is set so that it averages
after steps W + tau, W + 2 tau, ...). Options: ``warmup_steps`` W of synchronous SGD first (gradients
averaged every step); ``scale_lr`` multiplies the learning rate by K, as Kaldi nnet3 does (its
"effective learning rate" times the number of jobs), since averaging K models that each moved by
lr * g_k moves the average only by lr * mean(g_k).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from asr_parallel.strategies.base import counting_collectives
from asr_parallel.strategies.periodic import PeriodicSync, check_period, float_buffers


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimiser's per-parameter floating-point state (not its step counters)."""
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                    out.append(value)
    return out


class ModelAveraging(PeriodicSync):
    name = "model_averaging"

    @dataclass
    class Params:
        sync_period: int = 50  # tau: local steps between averagings
        warmup_steps: int = 0  # steps of synchronous SGD before local steps start
        scale_lr: bool = False  # multiply the learning rate by the number of ranks (Kaldi nnet3)
        average_optimizer_state: bool = False  # average the optimiser's moments too

        def __post_init__(self):
            check_period(self)

    def init_state(self) -> None:
        if getattr(self, "averager", None) is not None:
            return
        import torch.distributed as tdist

        self.averager = None
        if tdist.is_initialized():
            from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

            with warnings.catch_warnings():  # it warns that period 1 is what DDP does; that is the point
                warnings.simplefilter("ignore")
                self.averager = PeriodicModelAverager(period=self.params.sync_period,
                                                      warmup_steps=self.warmup_steps + self.params.sync_period - 1,
                                                      process_group=self.group)

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if self.params.scale_lr:
            for group in optimizer.param_groups:
                group["lr"] *= self.k

    def after_optimizer_step(self, step: int, model, optimizer) -> None:
        if self.averager is not None:  # called every step: the averager keeps its own step count
            before = self.comm.calls
            with counting_collectives(self.comm, self.label):
                self.averager.average_parameters(self.module.parameters())
            if self.k > 1 and (self.comm.calls > before) != self.is_sync_step(step):
                raise RuntimeError(f"PeriodicModelAverager averaged at step {step} against the schedule "
                                   f"(sync_period {self.params.sync_period}, warm-up {self.warmup_steps})")
        super().after_optimizer_step(step, model, optimizer)

    def synchronize(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Parameters were averaged by the averager; average buffers (and optimiser state) too."""
        extra = float_buffers(self.module)
        if self.params.average_optimizer_state:
            extra += optimizer_state_tensors(optimizer)
        if extra and self.averager is not None and self.k > 1:
            from torch.distributed.algorithms.model_averaging.utils import average_parameters

            with counting_collectives(self.comm, "state"):
                average_parameters(iter(extra), self.group)
        self.set_global_from_local()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["averager_step"] = self.averager.step if self.averager is not None else self.step
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.averager is not None:
            self.averager.step = state["averager_step"]
