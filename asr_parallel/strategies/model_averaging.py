"""``model_averaging``: tau local SGD steps on every rank, then the parameters are averaged.

Zinkevich, Weimer, Smola, Li, "Parallelized stochastic gradient descent" (NIPS 2010); Su, Chen, Xu,
"Experiments on parallel training of deep neural network using model averaging" (2015); Kaldi nnet3
(Povey, Zhang, Khudanpur, "Parallel training of DNNs with natural gradient and parameter averaging",
ICLR 2015 workshop); the rule of torch's ``PeriodicModelAverager`` (post-local SGD, Lin et al., ICLR
2020). Every rank k runs tau steps on its own data from the common model, then

    w <- (1/K) * sum_k w_k                          (one all-reduce)

Floating-point buffers (batch-norm statistics, averaged as Kaldi does) and, with
``average_optimizer_state``, the optimiser's per-parameter state (Adam's two moments, SGD's momentum)
travel in the same all-reduce, with the count of skipped steps (:mod:`~asr_parallel.strategies.periodic`).
Traffic per rank per synchronisation: 2 (K-1)/K * (P + buffers [+ optimiser state] + 1) * b bytes.

Options: a warm-up of ``warmup_steps`` W (``warmup: sync``: synchronous SGD through DDP;
``local_broadcast``: local steps, then rank 0's model broadcast, as BMUF's warm-up in fairseq), so
that model averaging and BMUF can be compared at the same warm-up; ``scale_lr`` multiplies the
learning rate by K, as Kaldi nnet3 does (its "effective learning rate" times the number of jobs),
since averaging K models that each moved by lr * g_k moves the average only by lr * mean(g_k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asr_parallel.strategies.periodic import PeriodicSync, check_period, float_buffers, unflatten_into


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
        warmup_steps: int = 0  # W: warm-up steps before the first local block
        warmup: str = "sync"  # sync (synchronous SGD) | local_broadcast (local steps, then rank 0's model)
        scale_lr: bool = False  # multiply the learning rate by the number of ranks (Kaldi nnet3)
        average_optimizer_state: bool = False  # average the optimiser's moments too

        def __post_init__(self):
            check_period(self)

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if self.params.scale_lr:
            for group in optimizer.param_groups:
                group["lr"] *= self.k

    def synchronize(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        extra = optimizer_state_tensors(optimizer) if self.params.average_optimizer_state else []
        params, bufs = self.params_list(), float_buffers(self.module)
        p_sum, b_sum, e_sum = self.allreduce_model(extra)
        unflatten_into(p_sum / self.k, params)
        unflatten_into(b_sum / self.k, bufs)
        unflatten_into(e_sum / self.k, extra)
        self.set_global_from_local()
