"""``easgd``: elastic averaging SGD, synchronous form.

Zhang, Choromanska, LeCun, "Deep learning with elastic averaging SGD" (NIPS 2015), Algorithm 1
(synchronous EASGD). Every rank k keeps its local model x_k; all ranks keep the same centre variable
c. Every tau steps, with alpha = beta / K,

    x_k <- x_k - alpha * (x_k - c)                    for every rank k
    c   <- c + alpha * sum_k (x_k - c)                with the x_k from before their update

The sum needs one all-reduce of the local models; every rank then updates its copy of c identically.
The elastic force lets local models explore away from the centre (beta about 0.9 in the paper).
Floating-point buffers (batch-norm statistics) follow the same rule. Traffic per rank per
synchronisation: 2 (K-1)/K * (P + buffers + 1) * b bytes (the 1: the count of skipped steps). The centre is in every checkpoint and is the
model evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asr_parallel.strategies.periodic import PeriodicSync, check_period, flatten, float_buffers, unflatten_into


class EASGD(PeriodicSync):
    name = "easgd"

    @dataclass
    class Params:
        sync_period: int = 10  # tau: local steps between elastic updates
        beta: float = 0.9  # moving rate; alpha = beta / K

        def __post_init__(self):
            check_period(self)
            if not 0.0 < self.beta <= 1.0:
                raise ValueError(f"strategy.beta must be in (0, 1], got {self.beta}")

    @property
    def alpha(self) -> float:
        return self.params.beta / self.k

    def synchronize(self, step: int, optimizer) -> None:
        local_tensors = self.params_list() + float_buffers(self.module)
        centre_tensors = list(self.global_model.parameters()) + float_buffers(self.global_model)
        x = flatten(local_tensors)
        c = flatten(centre_tensors)
        p_sum, b_sum, _ = self.allreduce_model()  # sum_k x_k
        total = torch.cat([p_sum, b_sum])
        unflatten_into(x - self.alpha * (x - c), local_tensors)
        unflatten_into(c + self.alpha * (total - self.k * c), centre_tensors)

    def eval_model(self, model):
        return self.global_model  # the centre (equal to every local model until the first update)
