"""``pipelined_bp``: pipelined back-propagation across ranks.

Petrowski, Dreyfus, Girault, "Performance analysis of a pipelined backpropagation parallel
algorithm" (IEEE Trans. Neural Networks 4(6), 1993); Chen, Wang, Li, Xu, Li, "Pipelined
back-propagation for context-dependent deep neural networks" (Interspeech 2012). The model's stages
are cut into S contiguous parts on S ranks (:mod:`asr_parallel.strategies.pipeline`). At every
clock tick t (one trainer step) each part s

* runs the forward pass of minibatch t - s (part 0 reads a new minibatch, the others receive the
  activation part s - 1 sent at tick t - 1) and sends its output on;
* runs the backward pass of minibatch t - 2(S-1) + s, with the output gradient part s + 1 sent at
  tick t - 1 (the last part: the minibatch whose forward pass it just ran, through the CTC loss),
  and sends the input gradient back;
* joins the tick's exchange of figures (one all-reduce of a few numbers over all parts), then
  clips its gradient and updates its weights.

So part s applies gradients of minibatches whose forward pass used weights 2(S-1-s) updates older
(the last part: none).

``schedule: forward_locked`` keeps the forward pass locked, as in decoupled parallel
back-propagation: at tick t every part runs the forward pass of minibatch t, one after the other
within the tick (part s receives part s - 1's activation of the same tick), and part s runs the
backward pass of minibatch t - (S-1-s) with the gradient part s + 1 sent at tick t - 1. Part s then
applies gradients S-1-s updates old instead of 2(S-1-s), and the forward passes no longer overlap.
With the recomputation at the current weights (the default) this is features replay (Huo, Gu,
Huang, "Training neural networks using features replay", NeurIPS 2018); with ``weight_stashing``
it is decoupled parallel back-propagation with delayed gradients (DDG: Huo, Gu, Yang, Huang,
"Decoupled parallel backpropagation with convergence guarantee", ICML 2018), whose module k
computes the gradient at the weights of its forward pass. The 2 x 2 grid {pipelined,
forward_locked} x {recompute, stash} is Chen et al.'s pipeline, PipeDream-style stashing, FR and
DDG.

``weight_prediction`` (SpecTrain: Chen, Yang, Cheng, "Efficient and robust parallel DNN training
through model parallelism on multi-GPU platform", 2018): part s runs the forward pass of a minibatch
with its weights predicted D updates ahead, D = the delay its gradient will have (2(S-1-s), or S-1-s
forward-locked, once the pipeline is full; n for the n-th minibatch after a fill), from the
optimiser's smoothed update (:meth:`PipelinedBP.predicted_weights`), and the backward pass
recomputes at the same predicted weights (kept as a stash, not predicted again at backward time:
our choice), so the gradient is taken near the weights it will be applied to. Without momentum the "smoothed" update is the last
gradient step, which SpecTrain's authors did not use. That delay is measured for every update (weight version at the update minus
the version the forward pass used) and logged per stage.

Gradient clipping: the update applied at a tick is one vector over all parts (part s's slice being
the gradient of minibatch t - 2(S-1) + s), and it is clipped by its global norm as
``clip_grad_norm_`` clips a non-pipelined step: every part scales its slice by
min(1, grad_clip / (norm + 1e-6)), the norm summed over the parts by the tick's exchange (no
extra call). No whole gradient of one minibatch exists at any tick (its slices are applied over
2(S-1) ticks), so this norm of the update actually applied is what "global" can mean here; with one
part it is exactly the non-pipelined clipping.

A non-finite loss or gradient: a part whose loss (last part) or own gradient is not finite skips its
update, sends a NaN input gradient back so that the parts below skip the same minibatch too, and
marks the tick bad where the skip originated (the trainer counts each bad minibatch once, naming
its utterances). Every part counts its skipped updates (``pipeline/skipped_updates_stage<s>`` in
TensorBoard, ``skipped_updates`` in the summary).

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
the pipeline's state small: stage inputs only.

Fill and drain: the pipeline fills at the start of every epoch and after every checkpoint, and is
drained (ticks without new input until every minibatch has been through part 0's backward pass,
2(S-1) ticks, S-1 when forward-locked) at
every epoch end and before every checkpoint (:meth:`PipelinedBP.prepare_checkpoint`, every
``train.checkpoint_every_steps`` steps), so that a checkpoint holds no minibatch in flight and a
resumed run continues exactly as an uninterrupted one. Drain ticks update the weights but advance
neither the learning-rate schedule nor the step counter; each drain costs 2(S-1) ticks (S-1
forward-locked), and the
minibatches after it see the delays of a filling pipeline (0, 1, ... on part 0). So
``checkpoint_every_steps`` changes what this strategy computes.
Traffic per boundary per minibatch: B*T*D*b activation bytes forward (plus a header and the lengths)
and B*T*D*b gradient bytes backward (T, D: frames and width at the cut); one exchange per tick.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from asr_parallel.strategies.pipeline import PipelineStrategy
from asr_parallel.train.loss import host_output_lengths


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
        schedule: str = "pipelined"  # "pipelined" (Chen et al. 2012) or "forward_locked" (FR, DDG)
        weight_prediction: bool = False  # SpecTrain: forward (and backward) at weights predicted ahead
        balance: str = "flops"  # cut balanced by "flops" or "params"
        boundaries: list[int] = field(default_factory=list)  # or explicit start stage of parts 1..S-1
        recv_timeout: float = 300.0  # seconds a stage waits for a neighbour before stopping with an error

        def __post_init__(self):
            if self.balance not in ("flops", "params"):
                raise ValueError(f"strategy.balance must be 'flops' or 'params', got '{self.balance}'")
            if self.recv_timeout <= 0:
                raise ValueError(f"strategy.recv_timeout must be > 0, got {self.recv_timeout}")
            if self.schedule not in ("pipelined", "forward_locked"):
                raise ValueError(f"strategy.schedule must be 'pipelined' or 'forward_locked', got '{self.schedule}'")

    def __init__(self, params, dist):
        super().__init__(params, dist)
        self.tick = 0  # clock ticks of the current fill-run-drain
        self.injected = 0  # minibatches that entered part 0 in this fill-run-drain
        self.done_before = 0  # minibatches of the earlier fill-run-drains (numbers delays globally)
        self.version = 0  # updates this part applied
        self.in_flight: dict[int, _InFlight] = {}
        # last part: the token sequences and (host) input lengths of minibatches in flight
        self.targets: dict[int, tuple] = {}
        self.ids: dict[int, list] = {}  # the utterance ids of minibatches in flight (every part)
        self.delays: list[tuple[int, int]] = []  # (minibatch, measured delay) of the last 1000 updates
        self.sends: list = []  # this tick's sends (work handles and their buffers)
        self.previous_sends: list = []
        self.last_update: list | None = None  # weight_prediction: the update this part applied last

    # -- the schedule: which minibatch each part works on at a tick
    def forward_lag(self, s: int) -> int:
        """Ticks between a minibatch entering part 0 and part s's forward pass of it."""
        return 0 if self.params.schedule == "forward_locked" else s

    def backward_lag(self, s: int) -> int:
        """Ticks between a minibatch entering part 0 and part s's backward pass of it (part 0's is the
        largest: the minibatch is done then)."""
        S = self.num_parts
        return S - 1 - s if self.params.schedule == "forward_locked" else 2 * (S - 1) - s

    # -- the trainer's hooks
    def train_step(self, batch, ctx) -> dict:
        self.injected += 1
        self.predict_traffic(batch.feats.shape[0], batch.feats.shape[1])
        out = self._tick(batch, ctx)
        ctx.advance()  # part 0 applies no update while the pipeline fills, but the schedule moves on
        return out

    def end_of_epoch(self, ctx) -> list[dict]:
        """Drain the pipeline: ticks without new input until every minibatch has been through part 0's
        backward pass; returns their figures (losses of the last minibatches)."""
        return self._drain(ctx)

    def prepare_checkpoint(self, ctx) -> list[dict]:
        """Drain the pipeline, so that the state to be saved holds no minibatch in flight."""
        return self._drain(ctx)

    def _drain(self, ctx) -> list[dict]:
        outs = []
        if self.injected:
            while self.tick < self.injected + self.backward_lag(0):
                outs.append(self._tick(None, ctx))
        self.finish_sends(self.previous_sends)
        self.previous_sends = []
        assert not self.in_flight and not self.targets and not self.ids, "minibatches left in the pipeline"
        self.done_before += self.injected
        self.tick, self.injected = 0, 0
        return outs

    def state_dict(self) -> dict:
        if self.injected:
            raise RuntimeError("pipelined_bp: state saved with minibatches in flight; the trainer must call "
                               "prepare_checkpoint() first")
        state = super().state_dict()
        state["pipelined_bp"] = {"version": self.version, "done_before": self.done_before,
                                 "delays": [list(d) for d in self.delays]}
        if self.last_update is not None:  # weight_prediction's last update
            state["pipelined_bp"]["last_update"] = [u.clone() for u in self.last_update]
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        p = state.get("pipelined_bp")
        if p is not None:
            self.version, self.done_before = p["version"], p["done_before"]
            self.delays = [tuple(d) for d in p["delays"]]
            if "last_update" in p:
                self.last_update = [u.to(w.device) for u, w in zip(p["last_update"], self.part.parameters())]

    def summary_figures(self) -> dict:
        return {**super().summary_figures(),
                "grad_clip": "global norm of each tick's update over all parts"}

    # -- one clock tick
    def _valid(self, n: int) -> bool:
        return 0 <= n < self.injected

    def _tick(self, batch, ctx) -> dict:
        s, S, dev = self.part_index, self.num_parts, ctx.device
        t0 = time.perf_counter()
        idle0 = self.idle
        if batch is not None:
            self.ids[self.injected - 1] = list(batch.cut_ids)
            if self.last:
                self.targets[self.injected - 1] = (batch.tokens, batch.lens_on_host)
        tick = self.tick
        n_f, n_b = tick - self.forward_lag(s), tick - self.backward_lag(s)
        self.part.train()
        loss = None
        if self._valid(n_f):
            x, lengths = self.part_input(batch, ctx)
            rng = torch.get_rng_state()
            cuda_rng = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
            if self.last:  # forward and backward of the same minibatch in this tick: keep the graph
                x_in = x.detach().requires_grad_(not self.first)
                with ctx.autocast():
                    logits, out_lens = self.part(x_in, lengths)
                tokens, host_lens = self.targets.pop(n_f)
                out_lens = host_output_lengths(self.model, out_lens, host_lens)  # CTC reads them on the host
                loss = ctx.loss_sum(logits, out_lens, tokens) / len(tokens)
                self.in_flight[n_f] = _InFlight(x_in, lengths, tuple(logits.shape), logits.dtype, self.version,
                                                rng, cuda_rng)
            else:
                if self.params.weight_prediction:  # SpecTrain: the weights this gradient will meet
                    # the delay this minibatch's gradient will have: D once the pipeline is full,
                    # n for the n-th minibatch after a fill (0, 1, ...)
                    stash = self.predicted_weights(min(self.backward_lag(s) - self.forward_lag(s), n_f))
                elif self.params.weight_stashing:
                    stash = [p.detach().clone() for p in self.part.parameters()]
                else:
                    stash = None
                with torch.no_grad(), ctx.autocast():
                    if stash is not None and self.params.weight_prediction:
                        from torch.func import functional_call

                        names = [name for name, _ in self.part.named_parameters()]
                        y, y_lens = functional_call(self.part, dict(zip(names, stash)), (x, lengths))
                    else:
                        y, y_lens = self.part(x, lengths)
                self.sends += self.send_activation(y, y_lens)
                self.in_flight[n_f] = _InFlight(x, lengths, tuple(y.shape), y.dtype, self.version, rng, cuda_rng,
                                                stash)
        mine: dict = {"loss": None}
        update = None
        if self._valid(n_b):
            update, mine = self._backward(n_b, loss, ctx)
        self.tick += 1
        # The previous tick's sends: the neighbours took them in this tick (a send completes when its
        # receive is posted, so waiting for this tick's sends here would deadlock).
        self.finish_sends(self.previous_sends)
        self.previous_sends, self.sends = self.sends, []
        self.busy += time.perf_counter() - t0 - (self.idle - idle0)
        figures = self.exchange(mine)
        self.predict_control()
        if update is not None:  # the update, clipped by the norm of this tick's update over all parts
            t1 = time.perf_counter()
            params = [p for p in self.part.parameters() if p.grad is not None]
            ctx.clip(params, torch.tensor(figures["sq_norm"] ** 0.5, dtype=torch.float32, device=dev))
            before = [p.detach().clone() for p in self.part.parameters()] if self.params.weight_prediction else None
            ctx.apply(torch.zeros(1, device=dev))
            if before is not None:
                self.last_update = [p.detach() - b for p, b in zip(self.part.parameters(), before)]
            self.version += 1
            self.busy += time.perf_counter() - t1
        bad_ids = [i for p in range(S) if figures["bad"][p] for i in self.ids.get(tick - self.backward_lag(p), [])]
        self.ids.pop(tick - self.backward_lag(0), None)  # part 0's backward pass was that minibatch's last
        if figures["any_bad"]:
            cut_ids = bad_ids
        else:
            cut_ids = list(batch.cut_ids) if batch is not None else []
        return self.step_output(figures, batch.num_frames if batch is not None else 0, cut_ids)

    def predicted_weights(self, ahead: int) -> list:
        """SpecTrain's prediction of this part's weights ``ahead`` updates from now: the current weights
        plus ``ahead`` times the update applied last, which is the optimiser's smoothed step (SGD with
        momentum: -lr times its momentum buffer, as Chen, Yang, Cheng 2018 predict; Adam and AdamW:
        -lr times m / (sqrt(v) + eps), with the decoupled decay); before any update, the weights."""
        weights = [p.detach() for p in self.part.parameters()]
        if self.last_update is None or ahead <= 0:
            return [w.clone() for w in weights]
        return [w + ahead * u for w, u in zip(weights, self.last_update)]

    def part_input(self, batch, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """The input of this part's forward pass: the batch's features (augmented) on part 0, else the
        activation the part below sent at the previous tick."""
        if self.first:
            x = batch.feats.to(ctx.device, non_blocking=True)
            return ctx.augment(x), batch.feat_lens.to(ctx.device)
        return self.recv_activation(ctx.device)

    def _backward(self, n: int, loss, ctx) -> tuple[int | None, dict]:
        """Minibatch ``n``'s backward pass on this part and the input gradient sent back. Returns
        (the delay of the update to make, or None to skip it) and this part's figures."""
        item = self.in_flight.pop(n)
        ctx.optimizer.zero_grad(set_to_none=True)
        mine: dict = {"loss": None}
        origin = False  # the minibatch turned bad on this part (not: a NaN gradient came from above)
        if self.last:
            mine["loss"] = float(loss.detach())
            finite = bool(torch.isfinite(loss.detach()))
            origin = not finite
            if finite:
                loss.backward()
            x_in = item.x
        else:
            grad_out = self.recv_gradient(item.out_shape, ctx.device, item.out_dtype)
            finite = bool(torch.isfinite(grad_out).all())
            x_in = item.x.detach().requires_grad_(not self.first)
            if finite:
                y, stashed = self._recompute(item, x_in, ctx)
                torch.autograd.backward(y, grad_out.to(y.dtype))
                if stashed is not None:  # gradients at the stashed weights, applied to the current ones
                    for p, w in zip(self.part.parameters(), stashed):
                        p.grad = w.grad
        params = [p for p in self.part.parameters() if p.grad is not None]
        if finite:
            sq_norm = float(ctx.grad_sq_norm(params)) if params else 0.0
            grad_ok = math.isfinite(sq_norm)
            if not self.first and x_in.grad is not None:
                grad_ok = grad_ok and bool(torch.isfinite(x_in.grad).all())
            if not grad_ok:
                finite, origin = False, True
            else:
                mine["sq_norm"] = sq_norm
        if not self.first:
            grad_in = x_in.grad if finite and x_in.grad is not None else torch.full_like(x_in, float("nan"))
            self.sends += self.send_gradient(grad_in.detach())
        mine["bad"] = origin
        if not finite:
            self.skipped += 1
            ctx.optimizer.zero_grad(set_to_none=True)
            return None, mine
        delay = self.version - item.version
        mine["staleness"] = delay
        self.delays.append((self.done_before + n, delay))
        del self.delays[:-1000]
        return delay, mine

    def _recompute(self, item: _InFlight, x_in: torch.Tensor, ctx):
        """The part's forward pass again, with the forward pass's random state and batch-norm
        statistics left as they were; with the stashed weights under weight stashing."""
        stashed = None
        buffers = [b for b in self.part.buffers() if b.is_floating_point()]
        saved_buffers = [b.detach().clone() for b in buffers]
        rng_now = torch.get_rng_state()
        torch.set_rng_state(item.rng)
        if item.cuda_rng is not None:
            cuda_now = torch.cuda.get_rng_state(ctx.device)
            torch.cuda.set_rng_state(item.cuda_rng, ctx.device)
        try:
            with ctx.autocast():
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
                torch.cuda.set_rng_state(cuda_now, ctx.device)
            for b, v in zip(buffers, saved_buffers):
                b.data.copy_(v)
        return y, stashed
