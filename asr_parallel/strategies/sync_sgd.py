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

``compression`` (``none``, ``bf16``, ``fp16``, ``powersgd``, ``onebit``) compresses the buckets from
step ``start_step`` + 1 on: :mod:`asr_parallel.strategies.compression` gives each scheme, its paper
and its traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from asr_parallel.strategies.base import Strategy
from asr_parallel.strategies.compression import SCHEMES, CompressionState
from asr_parallel.strategies.ddp import bucket_bytes, ddp_wrap, note_rebuild, set_weight


class SyncSGD(Strategy):
    name = "sync_sgd"

    @dataclass
    class Params:
        bucket_cap_mb: float = 0.0  # DDP bucket size; 0: torch's default (a 1 MiB first bucket, then 25 MiB)
        # DDP's unused-parameter search all-reduces a map of used parameters every step outside the
        # communication hook (uncounted) and changes the first step's buckets: not supported
        find_unused_parameters: bool = False
        compression: str = "none"  # none | bf16 | fp16 | powersgd | onebit
        powersgd_rank: int = 1  # PowerSGD's matrix approximation rank r
        powersgd_min_compression_rate: float = 2.0  # compress a matrix only if it shrinks by this much
        start_step: int = 2  # steps 1..start_step all-reduce plainly (torch's start_powerSGD_iter)

        def __post_init__(self):
            if self.compression not in SCHEMES:
                raise ValueError(f"strategy.compression must be one of {', '.join(SCHEMES)}, got {self.compression!r}")
            if self.powersgd_rank < 1:
                raise ValueError(f"strategy.powersgd_rank must be >= 1, got {self.powersgd_rank}")
            if self.powersgd_min_compression_rate < 0:
                raise ValueError("strategy.powersgd_min_compression_rate must be >= 0, got "
                                 f"{self.powersgd_min_compression_rate}")
            least = 2 if self.compression == "powersgd" else 1
            if self.compression != "none" and self.start_step < least:
                raise ValueError(f"strategy.start_step must be >= {least} with compression {self.compression}, "
                                 f"got {self.start_step}: DDP rebuilds its buckets after the first step"
                                 + (", and torch's PowerSGD needs two plain steps" if least == 2 else ""))
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
        p = self.params
        self.compression = None if p.compression == "none" else CompressionState(
            p.compression, p.start_step, p.powersgd_rank, p.powersgd_min_compression_rate)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        if not self.dist.distributed:
            return model
        if self.compression is not None:
            self.compression.attach(model)
        self.ddp, self.hook = ddp_wrap(model, self.dist, self.comm, None, "gradients", self.params.bucket_cap_mb,
                                       self.params.find_unused_parameters, self.compression)
        if self.compression is not None:
            self.compression.ddp = self.ddp
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
        if self.ddp is None:
            return {}
        out = {"ddp_bucket_bytes": bucket_bytes(self.ddp)}
        if self.compression is not None:  # the buckets' tensors as compressed, for the cost model
            out["compressed_bucket_shapes"] = [self.compression.shapes[i] for i in sorted(self.compression.shapes)]
            ps = self.compression.powersgd
            if ps is not None:  # what torch's PowerSGD hook allocated for P and Q, per bucket
                out["powersgd_memory"] = [[ps.p_memory_dict[i].numel(), ps.q_memory_dict[i].numel()]
                                          for i in sorted(ps.p_memory_dict)]
        return out

    def state_dict(self) -> dict:
        out = super().state_dict()
        if self.compression is not None:  # this rank's error and warm-start buffers
            out["compression"] = self.compression.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.compression is not None and "compression" in state:
            self.compression.load_state_dict(state["compression"])
