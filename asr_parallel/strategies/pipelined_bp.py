"""``pipelined_bp``: pipelined back-propagation across ranks.

Petrowski, Dreyfus, Girault, "Performance analysis of a pipelined backpropagation parallel
algorithm" (IEEE Trans. Neural Networks 4(6), 1993); Chen, Wang, Li, Xu, Li, "Pipelined
back-propagation for context-dependent deep neural networks" (Interspeech 2012). The model's stages
are cut into S contiguous parts on S ranks (:mod:`asr_parallel.strategies.pipeline`). At every
clock tick t each part s

* runs the forward pass of minibatch t - s (part 0 reads a new minibatch, the others receive the
  activation part s - 1 sent at tick t - 1) and sends its output on;
* runs the backward pass of minibatch t - 2(S-1) + s, with the output gradient part s + 1 sent at
  tick t - 1 (the last part: the minibatch whose forward pass it just ran, through the CTC loss),
  sends the input gradient back, and updates its weights at once.

So part s applies gradients of minibatches whose forward pass used weights 2(S-1-s) updates older
(the last part: none). That delay is measured for every update (weight version at the update minus
the version the forward pass used) and logged per stage. The pipeline fills at the start of every
epoch and is drained at its end, so no minibatch is lost.

The forward pass of parts 0..S-2 runs without keeping its graph; the backward pass recomputes it
from the stored stage input (with the random state of the forward pass, and without updating
batch-norm statistics twice):

* by default with the part's *current* weights: the stage input and the output gradient stay those
  of the older weights, as in Chen et al.'s hardware pipeline, whose backward products use the
  weights of the moment;
* with ``weight_stashing`` (PipeDream: Narayanan et al., SOSP 2019) with the weights the forward pass
  used, kept for every minibatch in flight, so the gradient is exactly that of the forward pass's
  weights (applied to the current ones).

Recomputing costs a second forward pass on parts 0..S-2 (about a third more compute there) and keeps
the pipeline's state small: stage inputs only. Because minibatches are in flight between epoch
ends, this strategy writes checkpoints only at epoch ends, where the pipeline is empty.
Traffic per boundary per minibatch: B*T*D*b activation bytes forward (plus a header and the lengths)
and B*T*D*b gradient bytes backward (T, D: frames and width at the cut).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch

from asr_parallel.strategies.pipeline import PipelineStrategy


@dataclass
class _InFlight:
    x: torch.Tensor  # the part's input (features on part 0)
    lengths: torch.Tensor
    out_shape: tuple  # shape of the activation sent on (of its gradient)
    out_dtype: torch.dtype
    version: int  # weight version the forward pass used
    rng: torch.Tensor
    cuda_rng: torch.Tensor | None
    stash: list | None = None  # the weights of the forward pass (weight stashing)


class PipelinedBP(PipelineStrategy):
    name = "pipelined_bp"

    @dataclass
    class Params:
        weight_stashing: bool = False  # backward passes use their forward pass's weights (PipeDream)
        balance: str = "flops"  # cut balanced by "flops" or "params"
        boundaries: list[int] = field(default_factory=list)  # or explicit start stage of parts 1..S-1
        recv_timeout: float = 300.0  # seconds a stage waits for a neighbour before stopping with an error

        def __post_init__(self):
            if self.balance not in ("flops", "params"):
                raise ValueError(f"strategy.balance must be 'flops' or 'params', got '{self.balance}'")
            if self.recv_timeout <= 0:
                raise ValueError(f"strategy.recv_timeout must be > 0, got {self.recv_timeout}")

    def __init__(self, params, dist):
        super().__init__(params, dist)
        self.tick = 0  # clock ticks of the current fill-run-drain
        self.injected = 0  # minibatches that entered part 0 in this run
        self.version = 0  # updates this part applied
        self.in_flight: dict[int, _InFlight] = {}
        self.targets: dict[int, list] = {}  # last part: the token sequences of minibatches in flight
        self.delays: list[tuple[int, int]] = []  # (minibatch of this run, measured delay) of recent updates
        self.sends: list = []  # this tick's sends (work handles and their buffers)
        self.previous_sends: list = []

    # -- the trainer's hooks
    def checkpoint_ok(self) -> bool:
        return self.injected == 0

    def train_step(self, batch, trainer) -> dict:
        self.injected += 1
        self.predict_sends(batch.feats.shape[0], batch.feats.shape[1])
        out = self._tick(batch, trainer)
        with warnings.catch_warnings():  # part 0 applies no update while the pipeline fills
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            trainer.scheduler.step()
        trainer.step += 1
        return out

    def end_of_epoch(self, trainer) -> list[dict]:
        """Drain the pipeline: ticks without new input until every minibatch has been through part 0's
        backward pass; returns their figures (losses of the last minibatches)."""
        outs = []
        while self.tick < self.injected + 2 * (self.num_parts - 1):
            outs.append(self._tick(None, trainer))
        self.finish_sends(self.previous_sends)
        self.previous_sends = []
        self.tick, self.injected = 0, 0
        return outs

    # -- one clock tick
    def _valid(self, n: int) -> bool:
        return 0 <= n < self.injected

    def _tick(self, batch, trainer) -> dict:
        from asr_parallel.train.trainer import ctc_loss

        s, S, dev = self.part_index, self.num_parts, trainer.device
        t0 = time.perf_counter()
        idle0 = self.idle
        if batch is not None and self.last:
            self.targets[self.injected - 1] = batch.tokens
        mine = {"loss": None, "bad": False}
        n_f, n_b = self.tick - s, self.tick - 2 * (S - 1) + s
        self.part.train()
        loss = None
        if self._valid(n_f):
            if self.first:
                x, lengths = batch.feats.to(dev, non_blocking=True), batch.feat_lens.to(dev)
                if trainer.spec_augment is not None:
                    x = trainer.spec_augment(x)
            else:
                x, lengths = self.recv_activation(dev)
            rng = torch.get_rng_state()
            cuda_rng = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
            if self.last:  # forward and backward of the same minibatch in this tick: keep the graph
                x_in = x.detach().requires_grad_(not self.first)
                with trainer._autocast():
                    logits, out_lens = self.part(x_in, lengths)
                tokens = self.targets.pop(n_f)
                loss = ctc_loss(logits, out_lens, tokens) / len(tokens)
                self.in_flight[n_f] = _InFlight(x_in, lengths, tuple(logits.shape), logits.dtype, self.version,
                                                rng, cuda_rng)
            else:
                stash = [p.detach().clone() for p in self.part.parameters()] if self.params.weight_stashing else None
                with torch.no_grad(), trainer._autocast():
                    y, y_lens = self.part(x, lengths)
                self.sends += self.send_activation(y, y_lens)
                self.in_flight[n_f] = _InFlight(x, lengths, tuple(y.shape), y.dtype, self.version, rng, cuda_rng,
                                                stash)
        if self._valid(n_b):
            mine.update(self._backward(n_b, loss, trainer))
        self.tick += 1
        # The previous tick's sends: the neighbours took them in this tick (a send completes when its
        # receive is posted, so waiting for this tick's sends here would deadlock).
        self.finish_sends(self.previous_sends)
        self.previous_sends, self.sends = self.sends, []
        self.busy += time.perf_counter() - t0 - (self.idle - idle0)
        figures = self.exchange(mine)
        self.figures = figures
        bad = torch.tensor([1.0 if figures["bad"] else 0.0])
        loss_value = figures["loss"]
        return {"bad": bad, "loss": None if loss_value is None else torch.tensor(loss_value),
                "grad_norm": torch.tensor(figures["sq_norm"] ** 0.5), "frames": batch.num_frames if batch else 0,
                "cut_ids": batch.cut_ids if batch else []}

    def _backward(self, n: int, loss, trainer) -> dict:
        item = self.in_flight.pop(n)
        opt = trainer.optimizer
        opt.zero_grad(set_to_none=True)
        mine: dict = {}
        if self.last:
            mine["loss"] = float(loss.detach())
            finite = bool(torch.isfinite(loss.detach()))
            if finite:
                loss.backward()
            x_in = item.x
        else:
            grad_out = self.recv_gradient(item.out_shape, trainer.device, item.out_dtype)
            finite = bool(torch.isfinite(grad_out).all())
            x_in = item.x.detach().requires_grad_(not self.first)
            if finite:
                y, stashed = self._recompute(item, x_in, trainer)
                torch.autograd.backward(y, grad_out.to(y.dtype))
                if stashed is not None:  # gradients at the stashed weights, applied to the current ones
                    for p, w in zip(self.part.parameters(), stashed):
                        p.grad = w.grad
        if not self.first:
            grad_in = x_in.grad if finite and x_in.grad is not None else torch.full_like(x_in, float("nan"))
            self.sends += self.send_gradient(grad_in.detach())
        params = [p for p in self.part.parameters()]
        if finite and params:
            norm = torch.nn.utils.clip_grad_norm_(params, trainer.tc.grad_clip)
            finite = bool(torch.isfinite(norm))
            mine["sq_norm"] = float(norm) ** 2 if finite else 0.0
        if finite:
            if trainer.fused:
                opt.found_inf = torch.zeros((), device=trainer.device)
            opt.step()
            delay = self.version - item.version
            self.version += 1
            mine["staleness"] = delay
            self.delays.append((n, delay))
            del self.delays[:-1000]
        elif self.last:
            mine["bad"] = True
        return mine

    def _recompute(self, item: _InFlight, x_in: torch.Tensor, trainer):
        """The part's forward pass again, with the forward pass's random state and batch-norm
        statistics left as they were; with the stashed weights under weight stashing."""
        stashed = None
        buffers = [b for b in self.part.buffers() if b.is_floating_point()]
        saved_buffers = [b.detach().clone() for b in buffers]
        rng_now = torch.get_rng_state()
        torch.set_rng_state(item.rng)
        if item.cuda_rng is not None:
            cuda_now = torch.cuda.get_rng_state(trainer.device)
            torch.cuda.set_rng_state(item.cuda_rng, trainer.device)
        try:
            with trainer._autocast():
                if item.stash is not None:
                    from torch.func import functional_call

                    names = [name for name, _ in self.part.named_parameters()]
                    stashed = [w.requires_grad_(True) for w in item.stash]
                    y, _ = functional_call(self.part, dict(zip(names, stashed)), (x_in, item.lengths))
                else:
                    y, _ = self.part(x_in, item.lengths)
        finally:
            torch.set_rng_state(rng_now)
            if item.cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_now, trainer.device)
            for b, v in zip(buffers, saved_buffers):
                b.data.copy_(v)
        return y, stashed
