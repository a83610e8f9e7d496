"""Synchronous micro-batch pipelines on torch's ``torch.distributed.pipelining`` (GPipe, 1F1B).

The model is cut into S parts on S ranks (:mod:`asr_parallel.strategies.pipeline`); each minibatch
is split into M micro-batches that flow through the parts under torch's schedule
(``ScheduleGPipe``: all forwards, then all backwards; ``Schedule1F1B``: one forward, one backward
in the steady state); gradients accumulate over the micro-batches and are applied once per
minibatch (the loss is the CTC sum over the micro-batch's real utterances divided by the utterances
of the whole minibatch, ``scale_grads=False``). Gradient clipping uses the norm over all parts, and
a non-finite loss or gradient on any part makes every part skip the step: both from the step's
exchange of figures (one small all-reduce). So the update equals non-pipelined training on the same
minibatch when the model treats every utterance on its own (the MLP, the TDNN, the conformer with
``conv_norm: layer``; not with BatchNorm, whose statistics are then those of each micro-batch, dummy
utterances included) and without dropout (its random draws differ per micro-batch).

How speech batches fit torch's pipeline stages, which fix their shapes when built:

* every rank reads the same batches; the feature lengths reach every part as a keyword argument
  (split into micro-batches like the features) and each part derives its own input lengths from them,
  so only activations cross the boundaries;
* the batch is padded to a multiple of M utterances with dummy utterances of zero features and
  the full padded length (a valid length: every stage sees ordinary input, so nothing non-finite
  arises in them), whose loss weight is zero (left out of the loss); and the frames to a multiple
  of ``pad_frames`` (with ``pad_growth`` > 1 both the micro-batch size and the frames go up to a
  geometric ladder, :func:`ladder`, so that fewer shapes occur); SpecAugment (on part 0) draws its
  masks on the batch before the padding, as the
  non-pipelined step does; a stage and schedule are built for every (micro-batch size, frames) met,
  with explicit shapes (no shape-inference traffic), and the last ``cache_size`` are kept (builds,
  lookups and the hit rate go to the run summary, ``stage_cache``);
* activations cross in float32 (bf16 autocast stays inside the parts).

Every call of the schedule's batched point-to-point operations is counted, one per send and one per
receive (forward, backward, and the 4-byte neighbour handshake of every newly built stage: one send
and one receive per neighbour), as is the step's exchange (``control``); each wait has
``recv_timeout``. Bubble: an idle fraction of (S-1)/(M+S-1) per stage in theory; the waits are
measured. No minibatch is in flight between steps, so checkpoints need no preparation.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from asr_parallel.strategies.pipeline import PipelineStrategy, boundary_shapes, host_buffer, is_send
from asr_parallel.train.data import ladder


class CopyBack:
    """The last work of a batch of transfers through host buffers: its ``wait`` copies every received
    host buffer into its device tensor (``keep``: the host buffers of the sends, alive until then)."""

    def __init__(self, received: list, keep: list):
        self.received, self.keep = received, keep

    def wait(self, timeout=None):
        with torch.no_grad():  # the schedule's receive buffers may be leaves that require grad
            for target, host in self.received:
                target.copy_(host)
        return True


@dataclass
class MicroParams:
    microbatches: int = 4  # M
    balance: str = "flops"  # cut balanced by "flops" or "params"
    boundaries: list[int] = field(default_factory=list)  # or explicit start stage of parts 1..S-1
    pad_frames: int = 16  # frames padded to a multiple of this (fewer distinct shapes to build)
    # > 1: frames and micro-batch sizes padded up to a geometric ladder (each rung at least this
    # factor above the one before), so that few shapes recur and the built stages are reused
    pad_growth: float = 1.0
    cache_size: int = 16  # built stages kept, per distinct shape
    # hybrid data x pipeline (Yadan et al. 2013; PipeDream's replicated stages): R pipelines of
    # world_size / R stages, each reading its own shard; each stage averages its gradients over its R
    # replicas every step
    pipeline_replicas: int = 1
    recv_timeout: float = 300.0  # seconds a wait on a neighbour may take before stopping with an error

    def __post_init__(self):
        if self.microbatches < 1:
            raise ValueError(f"strategy.microbatches must be >= 1, got {self.microbatches}")
        if self.balance not in ("flops", "params"):
            raise ValueError(f"strategy.balance must be 'flops' or 'params', got '{self.balance}'")
        if self.pad_frames < 1 or self.cache_size < 1 or self.recv_timeout <= 0:
            raise ValueError("strategy.pad_frames and strategy.cache_size must be >= 1, recv_timeout > 0")
        if self.pipeline_replicas < 1:
            raise ValueError(f"strategy.pipeline_replicas must be >= 1, got {self.pipeline_replicas}")
        if self.pad_growth < 1.0:
            raise ValueError(f"strategy.pad_growth must be >= 1.0, got {self.pad_growth}")


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
        return (dense(y.float()), out_lens) if self.last else dense(y.float())


def dense(y: torch.Tensor) -> torch.Tensor:
    """``y`` with the row-major strides of its shape. ``contiguous()`` is not enough: a tensor with a
    dimension of size 1 counts as contiguous whatever that dimension's stride, and torch's pipeline
    stage compares the strides of every output with those it recorded when it was built (a conformer
    part's output for a micro-batch of one utterance is a transposed (T, 1, D) buffer, strides
    (D, D, 1) where (T*D, D, 1) was recorded: PipeliningShapeError, torch 2.11). The caller casts to
    float32 first: under bf16 autocast the last part's logits would fail the stage's dtype check."""
    expected, step = [], 1
    for size in reversed(y.shape):
        expected.append(step)
        step *= max(size, 1)  # as torch lays out an empty tensor
    if tuple(reversed(expected)) == y.stride():
        return y
    return y.clone(memory_format=torch.contiguous_format)


class MicroPipeline(PipelineStrategy):
    """Base of ``gpipe`` and ``one_f_one_b``; subclasses name torch's schedule class."""

    schedule_name = ""
    Params = MicroParams

    def __init__(self, params, dist):
        super().__init__(params, dist)
        if self.schedule_name == "Schedule1F1B" and params.microbatches < self.num_parts:
            raise ValueError(f"strategy 'one_f_one_b' needs microbatches >= the number of stages "
                             f"({self.num_parts}), got {params.microbatches}")
        self.schedules: OrderedDict = OrderedDict()
        self.utterances = 1
        self.tokens: list = []  # last stage: the minibatch's token sequences and output lengths (host)
        self.out_host = torch.zeros(0, dtype=torch.long)
        self.builds = 0
        self.lookups = 0

    def wrap_model(self, model: nn.Module) -> nn.Module:
        part = super().wrap_model(model)
        self.stage_module = _PartModule(self)
        return part

    # -- shapes and schedules
    def _schedule(self, micro: int, frames: int, feat_dim: int, device):
        key = (micro, frames)
        self.lookups += 1
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
                                 input_args=inputs, output_args=outputs, group=self.pipe_group)
        schedule = getattr(pp, self.schedule_name)(stage, self.params.microbatches, loss_fn=self._loss,
                                                   scale_grads=False)
        self.schedules[key] = schedule
        self.builds += 1
        while len(self.schedules) > self.params.cache_size:
            self.schedules.popitem(last=False)
        return schedule

    def _loss(self, output, rows: torch.Tensor) -> torch.Tensor:
        """CTC over the real utterances of a micro-batch, divided by the minibatch's utterances.

        The schedule's target is the padded batch's row numbers on the host (it splits it into
        micro-batches as it splits the input, and never moves it), so the micro-batch's tokens and
        output lengths come from the host-side lists of :meth:`train_step`: nothing is copied back
        from a device. The real utterances come first (padding utterances are the batch's last rows)."""
        from asr_parallel.train.loss import ctc_loss

        logits, _ = output
        first, count = int(rows[0]), len(rows)
        real = max(0, min(count, self.utterances - first))
        if real == 0:
            return logits.float().sum() * 0.0
        return ctc_loss(logits[:real], self.out_host[first:first + real],
                        self.tokens[first:first + real]) / self.utterances

    @contextmanager
    def _instrumented(self):
        """Count the bytes of the schedule's sends by direction, time its waits, and bound them."""
        import torch.distributed as tdist
        import torch.distributed.pipelining.schedules as sch

        batch_p2p, wait_p2p = sch._batch_p2p, sch._wait_batch_p2p
        strategy = self

        def counted(ops, desc=None):
            for op in ops:
                nbytes = op.tensor.numel() * op.tensor.element_size()
                send = is_send(op.op)
                # The neighbour handshake of a new stage goes out without a description.
                if desc is None:
                    label = "handshake"
                elif send:
                    label = "forward" if op.peer == strategy.global_rank(strategy.part_index + 1) else "backward"
                else:
                    label = "forward" if op.peer == strategy.global_rank(strategy.part_index - 1) else "backward"
                if send:
                    strategy.comm.add(nbytes, 1, label)
                    if label == "forward":
                        strategy.bytes_forward[strategy.part_index] += nbytes
                    elif label == "backward":
                        strategy.bytes_backward[strategy.part_index - 1] += nbytes
                else:
                    strategy.comm.add(0, 1, label)
                    strategy.comm.bytes_received += nbytes
            try:
                if not strategy.via_host:
                    return batch_p2p(ops, desc)
                return via_host(ops, desc)
            except RuntimeError as e:
                strategy._fail(desc or "neighbour handshake", -1, e)

        def via_host(ops, desc):
            """The schedule's transfers through host buffers (p2p_via_host): sends of host copies,
            receives into host buffers that a last work copies into the schedule's tensors once the
            others are done (the schedule waits for its works in order: torch 2.11's
            ``_wait_batch_p2p``, which every wait of its schedules goes through)."""
            staged, received = [], []
            for op in ops:
                host = host_buffer(op.op, op.tensor)
                if not is_send(op.op):
                    received.append((op.tensor, host))
                staged.append(tdist.P2POp(op.op, host, op.peer, op.group, op.tag))
            return list(batch_p2p(staged, desc)) + [CopyBack(received, [op.tensor for op in staged])]

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
    def train_step(self, batch, ctx) -> dict:
        m, dev = self.params.microbatches, ctx.device
        b, frames, feat_dim = batch.feats.shape
        total = ladder(-(-b // m), 1, self.params.pad_growth) * m
        padded_frames = ladder(frames, self.params.pad_frames, self.params.pad_growth)
        feats = batch.feats.to(dev, non_blocking=True)
        if self.first:
            feats = ctx.augment(feats)  # on the real batch, as the non-pipelined step draws its masks
        padded = torch.zeros(total, padded_frames, feat_dim, dtype=feats.dtype, device=dev)
        padded[:b, :frames] = feats
        # Dummy utterances: zero features of the full padded length (a valid length), no loss.
        lengths = torch.full((total,), padded_frames, dtype=torch.long)
        lengths[:b] = batch.lens_on_host
        if self.last:  # the real utterances' tokens and output lengths, on the host, for the loss
            self.tokens, self.out_host = batch.tokens, self.model.output_lengths(lengths)
        lengths = (lengths.pin_memory() if dev.type == "cuda" else lengths).to(dev, non_blocking=True)
        self.utterances = b
        builds = self.builds
        schedule = self._schedule(total // m, padded_frames, feat_dim, dev)
        self.predict_traffic(total // m, padded_frames, times=m, header=False)
        if self.builds > builds:  # a new stage greets each neighbour: one float32 each way
            neighbours = int(not self.first) + int(not self.last)
            self.predicted.add(4 * neighbours, 2 * neighbours, "handshake")
        self.predict_control()
        self.part.train()
        opt = ctx.optimizer
        opt.zero_grad(set_to_none=True)
        losses: list = []
        t0, idle0 = time.perf_counter(), self.idle
        with self._instrumented(), ctx.autocast():
            if self.first and self.last:  # one stage (one rank): the whole model, with the loss
                schedule.step(padded, lengths=lengths, target=torch.arange(total),
                              losses=losses, return_outputs=False)
            elif self.first:
                schedule.step(padded, lengths=lengths)
            elif self.last:
                schedule.step(lengths=lengths, target=torch.arange(total), losses=losses,
                              return_outputs=False)
            else:
                schedule.step(lengths=lengths)
        self.busy += time.perf_counter() - t0 - (self.idle - idle0)
        if self.pipeline_replicas > 1:
            self._average_over_replicas(b)
        loss = float(sum(l.detach().float() for l in losses)) if self.last else None
        params = [p for p in self.part.parameters() if p.grad is not None]
        sq_norm = float(ctx.grad_sq_norm(params)) if params else 0.0
        bad_here = (loss is not None and not math.isfinite(loss)) or not math.isfinite(sq_norm)
        figures = self.exchange({"loss": loss, "bad": bad_here, "sq_norm": sq_norm if not bad_here else 0.0})
        norm = figures["sq_norm"] ** 0.5
        if figures["any_bad"]:  # every part skips the step, as a non-pipelined step would
            self.skipped += 1
        else:
            ctx.clip(params, torch.tensor(norm, dtype=torch.float32, device=dev))  # the norm over all parts
            ctx.apply(torch.zeros(1, device=dev))
        ctx.advance()
        return self.step_output(figures, batch.num_frames, list(batch.cut_ids))

    def _average_over_replicas(self, utterances: int) -> None:
        """Hybrid data x pipeline: this stage's gradients (of the mean loss over this pipeline's
        ``utterances``) become those of the mean over all R pipelines' utterances: one all-reduce over
        the stage's replicas of the gradients times the utterances, and the utterance count
        (counted and predicted as ``replicas``)."""
        import torch.distributed as tdist

        params = list(self.part.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        dev = grads[0].device if grads else torch.device("cpu")
        flat = torch.cat([g.reshape(-1).float() * utterances for g in grads]
                         + [torch.tensor([float(utterances)], device=dev)])
        for counter in (self.comm, self.predicted):
            counter.all_reduce(flat.numel(), flat.element_size(), self.pipeline_replicas, "replicas")
        try:
            work = tdist.all_reduce(flat, group=self.replica_group, async_op=True)
        except RuntimeError as e:
            self._fail("gradients of the other replicas", -1, e)
        self._wait(work, "gradients of the other replicas", -1)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = (flat[offset:offset + n] / flat[-1]).view_as(p).to(p.dtype)
            offset += n

    def summary_figures(self) -> dict:
        """Besides the pipeline's figures: how often a step found its stage already built."""
        hits = self.lookups - self.builds
        return {**super().summary_figures(), "grad_clip": "global norm over all parts",
                "stage_cache": {"builds": self.builds, "lookups": self.lookups,
                                "hit_rate": round(hits / self.lookups, 4) if self.lookups else None}}
