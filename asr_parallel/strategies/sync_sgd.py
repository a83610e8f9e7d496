"""``sync_sgd``: synchronous mini-batch SGD with DistributedDataParallel.

Chen, Pan, Monga, Bengio, Jozefowicz, "Revisiting distributed synchronous SGD" (2016). Each of the
K ranks computes the gradient of its share of the global minibatch; the gradients are summed by an
all-reduce every step and divided by the utterances of all ranks, so every rank applies the same
update, exactly as one worker with the union minibatch would (also when the ranks' batches hold
different numbers of utterances):

    g = sum_k sum_{u in B_k} grad l_u / sum_k |B_k|,     w <- w - lr * g

Traffic per rank per step with a ring all-reduce: 2 (K-1)/K * (P + 2 per bucket) * b bytes (P
parameters of b bytes; each bucket carries the rank's utterance count and a bad-loss flag). The
all-reduce runs inside backward, bucket by bucket, each as soon as its gradients are ready (torch
DDP with its own bucketing: :mod:`asr_parallel.strategies.ddp`). Only the buckets ready before the
end of backward can overlap computation: for the default conformer the first bucket (1 MiB of the
last layers) does, while the second, about 91% of the model, is ready only when backward ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from asr_parallel.strategies.base import Strategy
from asr_parallel.strategies.ddp import bucket_bytes, ddp_wrap, note_rebuild, set_weight


class SyncSGD(Strategy):
    name = "sync_sgd"

    @dataclass
    class Params:
        bucket_cap_mb: float = 0.0  # DDP bucket size; 0: torch's default (a 1 MiB first bucket, then 25 MiB)
        # DDP's unused-parameter search all-reduces a map of used parameters every step outside the
        # communication hook (uncounted) and changes the first step's buckets: not supported
        find_unused_parameters: bool = False

        def __post_init__(self):
            if self.bucket_cap_mb < 0:
                raise ValueError(f"strategy.bucket_cap_mb must be >= 0, got {self.bucket_cap_mb}")
            if self.find_unused_parameters:
                raise ValueError("strategy.find_unused_parameters: true is not supported: DDP would all-reduce its "
                                 "map of used parameters every step outside the counted communication hook; every "
                                 "model of this recipe uses all its parameters")

    def __init__(self, params, dist):
        super().__init__(params, dist)
        self.ddp = None
        self.hook = None

    def wrap_model(self, model: nn.Module) -> nn.Module:
        if not self.dist.distributed:
            return model
        self.ddp, self.hook = ddp_wrap(model, self.dist, self.comm, None, "gradients", self.params.bucket_cap_mb,
                                       self.params.find_unused_parameters)
        return self.ddp

    def averages_gradients(self, step: int) -> bool:
        return self.ddp is not None

    def set_batch_weight(self, utterances, loss) -> None:
        set_weight(self.hook, utterances, loss)

    def after_backward(self, step, model) -> None:
        if self.ddp is not None:
            note_rebuild(self.ddp, self.hook)

    def eval_model(self, model: nn.Module) -> nn.Module:
        return model.module if hasattr(model, "module") else model

    def summary_figures(self) -> dict:
        return {"ddp_bucket_bytes": bucket_bytes(self.ddp)} if self.ddp is not None else {}
