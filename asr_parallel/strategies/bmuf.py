"""``bmuf``: blockwise model-update filtering.

Chen and Huo, "Scalable training of deep learning machines by incremental block training with
intra-block parallel optimization and blockwise model-update filtering" (ICASSP 2016); the same rule
as fairseq's ``optim/bmuf.py`` and CNTK's ``BlockMomentumSGD``. Every rank starts a block from the
common reference model W_ref(t-1), runs tau local optimiser steps on its own data and reaches W_k(t);
then, with one all-reduce,

    G(t)     = W_ref(t-1) - (1/K) sum_k W_k(t)        block "gradient" (a descent direction)
    Delta(t) = eta * Delta(t-1) + zeta * G(t)         block momentum eta, block learning rate zeta
    W_g(t)   = W_ref(t-1) - Delta(t)                  the global model
    W_ref(t) = W_g(t)                                 classic block momentum (CBM)
    W_ref(t) = W_g(t) - eta * Delta(t)                Nesterov block momentum (NBM)

and every rank continues from W_ref(t). eta = 0, zeta = 1 is model averaging. Chen and Huo recommend
eta close to 1 - 1/K; the defaults are fairseq's (eta 0.875, zeta 1, tau 50, CBM, a warm-up of 500
steps). fairseq's warm-up (``warmup: local_broadcast``, the default) trains locally on every rank,
then broadcasts rank 0's model and resets the optimiser's state; ``warmup: sync`` runs the warm-up as
synchronous SGD through DDP instead (:mod:`~asr_parallel.strategies.periodic`). Floating-point
buffers (batch-norm statistics) travel in the same all-reduce and are averaged, not filtered. Traffic
per rank per block: 2 (K-1)/K * (P + buffers + 1) * b bytes (the 1: the count of skipped steps). The
global model W_g, the reference W_ref and Delta are part of every checkpoint; W_g is the model
evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asr_parallel.strategies.periodic import PeriodicSync, check_period, flatten, float_buffers, unflatten_into


class BMUF(PeriodicSync):
    name = "bmuf"

    @dataclass
    class Params:
        sync_period: int = 50  # tau: local steps per block
        block_momentum: float = 0.875  # eta
        block_lr: float = 1.0  # zeta
        nesterov: bool = False  # Nesterov block momentum (NBM) instead of classic (CBM)
        warmup_steps: int = 500  # W: warm-up steps before the first block
        warmup: str = "local_broadcast"  # local_broadcast (fairseq) | sync (synchronous SGD through DDP)

        def __post_init__(self):
            check_period(self)
            if not 0.0 <= self.block_momentum < 1.0:
                raise ValueError(f"strategy.block_momentum must be in [0, 1), got {self.block_momentum}")
            if self.block_lr <= 0:
                raise ValueError(f"strategy.block_lr must be > 0, got {self.block_lr}")

    def init_state(self) -> None:
        self.reference = flatten(self.params_list()).clone()
        self.delta = torch.zeros_like(self.reference)

    def synchronize(self, step: int, optimizer) -> None:
        eta, zeta = self.params.block_momentum, self.params.block_lr
        summed, summed_bufs, _ = self.allreduce_model()
        mean = summed / self.k
        grad = self.reference - mean
        self.delta = eta * self.delta + zeta * grad
        global_params = self.reference - self.delta
        self.reference = global_params - eta * self.delta if self.params.nesterov else global_params.clone()
        unflatten_into(self.reference, self.params_list())
        bufs = summed_bufs / self.k
        unflatten_into(bufs, float_buffers(self.module))
        unflatten_into(global_params, list(self.global_model.parameters()))
        unflatten_into(bufs, float_buffers(self.global_model))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "reference": self.reference, "block_momentum": self.delta}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.reference = state["reference"].to(self.reference.device)
        self.delta = state["block_momentum"].to(self.delta.device)
