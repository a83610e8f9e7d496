"""Synchronous micro-batch pipelines on torch's ``torch.distributed.pipelining`` (GPipe, 1F1B).

The model is cut into S parts on S ranks (:mod:`asr_parallel.strategies.pipeline`); each minibatch
is split into M micro-batches that flow through the parts under torch's schedule
(``ScheduleGPipe``: all forwards, then all backwards; ``Schedule1F1B``: one forward, one backward
in the steady state); gradients accumulate over the micro-batches and are applied once per
minibatch, so the update equals non-pipelined training on the same minibatch (the loss is the CTC
sum over the micro-batch divided by the utterances of the whole minibatch, ``scale_grads=False``).
Gradient clipping uses the norm over all parts (one small all-reduce).

How speech batches fit torch's pipeline stages, which fix their shapes when built:

* every rank reads the same batches; the feature lengths reach every part as a keyword argument
  (split into micro-batches like the features) and each part derives its own input lengths from them,
  so only activations cross the boundaries;
* the batch is padded to a multiple of M utterances with dummy utterances that add nothing to the
  loss, and the frames to a multiple of ``pad_frames``; a stage and schedule are built for every
  (micro-batch size, frames) met, with explicit shapes (no shape-inference traffic), and the last
  ``cache_size`` are kept;
* activations cross in float32 (bf16 autocast stays inside the parts).

Bytes are counted at the schedule's batched point-to-point calls (forward sends, backward sends,
and the 4-byte neighbour handshake of every newly built stage); each wait has ``recv_timeout``.
Bubble: an idle fraction of (S-1)/(M+S-1) per stage in theory; the waits are measured.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from asr_parallel.strategies.pipeline import PipelineStrategy, boundary_shapes


@dataclass
class MicroParams:
    microbatches: int = 4  # M
    balance: str = "flops"  # cut balanced by "flops" or "params"
    boundaries: list[int] = field(default_factory=list)  # or explicit start stage of parts 1..S-1
    pad_frames: int = 16  # frames padded to a multiple of this (fewer distinct shapes to build)
    cache_size: int = 16  # built stages kept, per distinct shape
    recv_timeout: float = 300.0  # seconds a wait on a neighbour may take before stopping with an error

    def __post_init__(self):
        if self.microbatches < 1:
            raise ValueError(f"strategy.microbatches must be >= 1, got {self.microbatches}")
        if self.balance not in ("flops", "params"):
            raise ValueError(f"strategy.balance must be 'flops' or 'params', got '{self.balance}'")
        if self.pad_frames < 1 or self.cache_size < 1 or self.recv_timeout <= 0:
            raise ValueError("strategy.pad_frames and strategy.cache_size must be >= 1, recv_timeout > 0")


class _PartModule(nn.Module):
    """This rank's part as torch's pipeline stage sees it: (x, lengths=feature lengths) -> x, or on the
    last part (logits, output lengths)."""

    def __init__(self, strategy: "MicroPipeline"):
        super().__init__()
        self.part = strategy.part
        self.lead = list(strategy.model.stages)[:strategy.part.start]  # stages before this part
        self.last = strategy.last

    def forward(self, x, lengths):
        for stage in self.lead:
            lengths = stage.output_lengths(lengths)
        y, out_lens = self.part(x, lengths)
        return (y, out_lens) if self.last else y.float().contiguous()


def pack_targets(tokens: list[list[int]], total: int) -> torch.Tensor:
    """(total, 1 + longest) int64: column 0 the target length (-1 for padding utterances), then tokens."""
    longest = max((len(t) for t in tokens), default=1)
    out = torch.zeros(total, 1 + longest, dtype=torch.long)
    out[:, 0] = -1
    for i, t in enumerate(tokens):
        out[i, 0] = len(t)
        out[i, 1:1 + len(t)] = torch.tensor(t, dtype=torch.long)
    return out


class MicroPipeline(PipelineStrategy):
    """Base of ``gpipe`` and ``one_f_one_b``; subclasses name torch's schedule class."""

    schedule_name = ""
    Params = MicroParams

    def __init__(self, params, dist):
        super().__init__(params, dist)
        if self.schedule_name == "Schedule1F1B" and params.microbatches < dist.world_size:
            raise ValueError(f"strategy 'one_f_one_b' needs microbatches >= the number of stages "
                             f"({dist.world_size}), got {params.microbatches}")
        self.schedules: OrderedDict = OrderedDict()
        self.utterances = 1
        self.builds = 0

    def wrap_model(self, model: nn.Module) -> nn.Module:
        part = super().wrap_model(model)
        self.stage_module = _PartModule(self)
        return part

    # -- shapes and schedules
    def _schedule(self, micro: int, frames: int, feat_dim: int, device):
        key = (micro, frames)
        if key in self.schedules:
            self.schedules.move_to_end(key)
            return self.schedules[key]
        import torch.distributed.pipelining as pp

        shapes = [(micro, frames, feat_dim)] + boundary_shapes(self.model, self.starts, micro, frames)
        meta = lambda shape, dtype=torch.float32: torch.empty(*shape, dtype=dtype, device="meta")  # noqa: E731
        lengths = meta((micro,), torch.long)
        inputs = (meta(shapes[self.part_index]),)
        if self.last:
            t_out = boundary_shapes(self.model, self.starts + [len(self.model.stages)], micro, frames)[-1][1]
            vocab = self.model.stages[-1].output_dim
            outputs = (meta((micro, t_out, vocab)), lengths)
        else:
            outputs = (meta(shapes[self.part_index + 1]),)
        stage = pp.PipelineStage(self.stage_module, self.part_index, self.num_parts, device,
                                 input_args=inputs, output_args=outputs)
        schedule = getattr(pp, self.schedule_name)(stage, self.params.microbatches, loss_fn=self._loss,
                                                   scale_grads=False)
        self.schedules[key] = schedule
        self.builds += 1
        while len(self.schedules) > self.params.cache_size:
            self.schedules.popitem(last=False)
        return schedule

    def _loss(self, output, packed: torch.Tensor) -> torch.Tensor:
        """CTC over the real utterances of a micro-batch, divided by the minibatch's utterances."""
        from asr_parallel.train.trainer import ctc_loss

        logits, out_lens = output
        keep = (packed[:, 0] >= 0).nonzero().flatten().tolist()
        if not keep:
            return logits.float().sum() * 0.0
        tokens = [packed[i, 1:1 + int(packed[i, 0])].tolist() for i in keep]
        idx = torch.tensor(keep, device=logits.device)
        return ctc_loss(logits[idx], out_lens[idx], tokens) / self.utterances

    @contextmanager
    def _instrumented(self):
        """Count the bytes of the schedule's sends by direction, time its waits, and bound them."""
        import torch.distributed.pipelining.schedules as sch

        batch_p2p, wait_p2p = sch._batch_p2p, sch._wait_batch_p2p
        strategy = self

        def counted(ops, desc=None):
            for op in ops:
                if getattr(op.op, "__name__", "") == "isend":
                    nbytes = op.tensor.numel() * op.tensor.element_size()
                    # The neighbour handshake of a new stage goes out without a description.
                    label = "handshake" if desc is None else (
                        "forward" if op.peer == strategy.part_index + 1 else "backward")
                    strategy.comm.add(nbytes, 1, label)
                    if label == "forward":
                        strategy.bytes_forward[strategy.part_index] += nbytes
                    elif label == "backward":
                        strategy.bytes_backward[strategy.part_index - 1] += nbytes
            try:
                return batch_p2p(ops, desc)
            except RuntimeError as e:
                strategy._fail(desc or "neighbour handshake", -1, e)

        def timed_wait(works):
            t0 = time.perf_counter()
            for w in works:
                strategy._wait(w, "pipeline transfer", -1)
            strategy.idle += time.perf_counter() - t0

        sch._batch_p2p, sch._wait_batch_p2p = counted, timed_wait
        try:
            yield
        finally:
            sch._batch_p2p, sch._wait_batch_p2p = batch_p2p, wait_p2p

    # -- one minibatch
    def train_step(self, batch, trainer) -> dict:
        m, dev = self.params.microbatches, trainer.device
        b, frames, feat_dim = batch.feats.shape
        total = -(-b // m) * m
        padded_frames = -(-frames // self.params.pad_frames) * self.params.pad_frames
        feats = torch.zeros(total, padded_frames, feat_dim)
        feats[:b, :frames] = batch.feats
        lengths = torch.ones(total, dtype=torch.long)
        lengths[:b] = batch.feat_lens
        feats, lengths = feats.to(dev, non_blocking=True), lengths.to(dev)
        if self.first and trainer.spec_augment is not None:
            feats = trainer.spec_augment(feats)
        self.utterances = b
        builds = self.builds
        schedule = self._schedule(total // m, padded_frames, feat_dim, dev)
        self.predict_sends(total // m, padded_frames, times=m, header=False)
        if self.builds > builds:  # a new stage greets each neighbour with one float32
            neighbours = int(not self.first) + int(not self.last)
            self.predicted.add(4 * neighbours, neighbours, "handshake")
        self.part.train()
        opt = trainer.optimizer
        opt.zero_grad(set_to_none=True)
        losses: list = []
        t0, idle0 = time.perf_counter(), self.idle
        with self._instrumented(), trainer._autocast():
            if self.first:
                schedule.step(feats, lengths=lengths)
            elif self.last:
                schedule.step(lengths=lengths, target=pack_targets(batch.tokens, total).to(dev), losses=losses,
                              return_outputs=False)
            else:
                schedule.step(lengths=lengths)
        self.busy += time.perf_counter() - t0 - (self.idle - idle0)
        loss = float(sum(l.detach().float() for l in losses)) if self.last else None
        params = [p for p in self.part.parameters() if p.grad is not None]
        sq_norm = float(sum(p.grad.detach().float().pow(2).sum() for p in params)) if params else 0.0
        bad_here = (loss is not None and not torch.isfinite(torch.tensor(loss))) or not torch.isfinite(
            torch.tensor(sq_norm))
        figures = self.exchange({"loss": loss, "bad": bad_here, "sq_norm": sq_norm if not bad_here else 0.0})
        self.figures = figures
        norm = figures["sq_norm"] ** 0.5
        if not figures["bad"]:
            coef = min(1.0, trainer.tc.grad_clip / (norm + 1e-6))  # as clip_grad_norm_, over all parts
            if coef < 1.0:
                for p in params:
                    p.grad.mul_(coef)
            if trainer.fused:
                opt.found_inf = torch.zeros((), device=dev)
            opt.step()
        trainer.scheduler.step()
        trainer.step += 1
        return {"bad": torch.tensor([1.0 if figures["bad"] else 0.0]),
                "loss": None if figures["loss"] is None else torch.tensor(figures["loss"]),
                "grad_norm": torch.tensor(norm), "frames": batch.num_frames, "cut_ids": batch.cut_ids}
