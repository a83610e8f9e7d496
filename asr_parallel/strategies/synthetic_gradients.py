"""``synthetic_gradients``: decoupled neural interfaces across ranks.

Jaderberg, Czarnecki, Osindero, Vinyals, Graves, Silver, Kavukcuoglu, "Decoupled neural interfaces
using synthetic gradients" (ICML 2017). The model is cut into S parts on S ranks, as for
``pipelined_bp`` (:mod:`asr_parallel.strategies.pipeline`). Every part but the last owns a small
synthesiser M_s that predicts, frame by frame, the gradient of the loss with respect to the part's
output h_s: ``M_s(h) = W_2 relu(W_1 [h; c])`` with W_2 (and its bias) zero at the start, so that the
lower parts begin by standing still (the paper's zero initialisation); with ``conditioned`` (cDNI) c
is the utterance's bag of target tokens (token counts over the target length), else nothing. Padded
frames get a zero prediction.

At every clock tick t (one trainer step) part s

* runs the forward pass of minibatch t - s (part 0 reads a new minibatch, the others receive the
  activation part s - 1 sent at tick t - 1) and sends its output on;
* without waiting for anything: back-propagates M_s(h) through itself and updates at once (the last
  part: the CTC loss of the minibatch, its true gradient); parts above 0 send the gradient of their
  input back, which is the true gradient for part S-2 and, further down, the gradient bootstrapped
  from the synthesiser above (as in the paper's stacks of DNIs);
* trains M_s on the gradient part s + 1 sent at tick t - 1, that of minibatch t - s - 2, whose output
  it kept: one step of ``synth_optimizer`` (Adam or SGD at ``synth_lr``) on the mean squared error
  over the real frames.

So no part waits for a backward pass: the updates use gradients with no delay but a prediction
error, and the synthesisers learn from targets two ticks old. The update of each part is clipped by
its own gradient norm (no global gradient exists at any tick); a part with a non-finite loss or
gradient skips its update (and the synthesiser its step). One part equals plain SGD.

Fill and drain as ``pipelined_bp``: ticks without new input until part S-2 has the target of the
last minibatch (S ticks) at every epoch end and before every checkpoint, so checkpoints hold no
minibatch in flight; the synthesisers and their optimisers are in the checkpoints. Traffic per
boundary per minibatch: the activation forward and one gradient back, both in float32.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from asr_parallel.strategies.pipelined_bp import PipelinedBP
from asr_parallel.train.loss import host_output_lengths


class Synthesiser(nn.Module):
    """M(h) = W_2 relu(W_1 [h; c] + b_1) + b_2 per frame; W_1 drawn from N(0, 1/fan_in) by a generator
    seeded with ``seed`` (reproducible across ranks and tests), W_2 and b_2 zero."""

    def __init__(self, dim: int, hidden: int, cond_dim: int, seed: int):
        super().__init__()
        self.inp = nn.Linear(dim + cond_dim, hidden)
        self.out = nn.Linear(hidden, dim)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.inp.weight.copy_(torch.randn(self.inp.weight.shape, generator=g) / math.sqrt(dim + cond_dim))
            self.inp.bias.zero_()
            self.out.weight.zero_()
            self.out.bias.zero_()

    def forward(self, h: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None:
            h = torch.cat([h, cond[:, None, :].expand(-1, h.shape[1], -1).to(h.dtype)], dim=-1)
        return self.out(torch.relu(self.inp(h))) * mask[..., None].to(h.dtype)


def bag_of_tokens(tokens: list[list[int]], vocab: int, device) -> torch.Tensor:
    """(B, vocab): each utterance's token counts divided by its target length (cDNI's condition),
    built on the CPU and moved once."""
    out = torch.zeros(len(tokens), vocab)
    for i, t in enumerate(tokens):
        if t:
            out[i].index_add_(0, torch.tensor(t, dtype=torch.long), torch.full((len(t),), 1.0 / len(t)))
    return out.to(device)


def frame_mask(lengths: torch.Tensor, frames: int) -> torch.Tensor:
    return torch.arange(frames, device=lengths.device)[None, :] < lengths[:, None]


@dataclass
class _Kept:
    h: torch.Tensor  # the part's output (detached)
    lengths: torch.Tensor
    cond: torch.Tensor | None


class SyntheticGradients(PipelinedBP):
    name = "synthetic_gradients"

    @dataclass
    class Params:
        synth_hidden: int = 256  # width of the synthesiser's hidden layer
        synth_lr: float = 1e-3
        synth_optimizer: str = "adam"  # adam | sgd
        conditioned: bool = False  # cDNI: the synthesiser also sees the utterance's target tokens
        balance: str = "flops"
        boundaries: list[int] = field(default_factory=list)
        recv_timeout: float = 300.0

        def __post_init__(self):
            if self.synth_hidden < 1 or self.synth_lr <= 0:
                raise ValueError("strategy.synth_hidden must be >= 1 and strategy.synth_lr > 0")
            if self.synth_optimizer not in ("adam", "sgd"):
                raise ValueError(f"strategy.synth_optimizer must be 'adam' or 'sgd', got '{self.synth_optimizer}'")
            if self.balance not in ("flops", "params"):
                raise ValueError(f"strategy.balance must be 'flops' or 'params', got '{self.balance}'")
            if self.recv_timeout <= 0:
                raise ValueError(f"strategy.recv_timeout must be > 0, got {self.recv_timeout}")

        # what PipelinedBP's code reads
        schedule = "pipelined"
        weight_stashing = False
        weight_prediction = False

    def __init__(self, params, dist):
        super().__init__(params, dist)
        self.kept: dict[int, _Kept] = {}
        self.synth = None
        self.synth_opt = None
        self.synth_mse: list[float] = []  # since the last log

    def wrap_model(self, model: nn.Module) -> nn.Module:
        part = super().wrap_model(model)
        if not self.last:
            dim = self._output_dim(model)
            vocab = model.stages[-1].output_dim
            p = self.params
            self.synth = Synthesiser(dim, p.synth_hidden, vocab if p.conditioned else 0, seed=1000 + self.part_index)
            device = next(part.parameters()).device
            self.synth.to(device)
            opt = torch.optim.Adam if p.synth_optimizer == "adam" else torch.optim.SGD
            self.synth_opt = opt(self.synth.parameters(), lr=p.synth_lr)
        return part

    def _output_dim(self, model) -> int:
        from asr_parallel.strategies.pipeline import boundary_shapes

        return boundary_shapes(model, self.starts, 1, 64)[self.part_index][2]

    def backward_lag(self, s: int) -> int:
        """The drain's length: part S-2 receives the target of the last minibatch S ticks after it
        entered (``_drain`` runs ticks while tick < injected + backward_lag(0))."""
        return self.num_parts if s == 0 and self.num_parts > 1 else 0

    # -- checkpoints
    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.synth is not None:
            state["synthetic_gradients"] = {"synth": self.synth.state_dict(), "opt": self.synth_opt.state_dict()}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        p = state.get("synthetic_gradients")
        if p is not None and self.synth is not None:
            self.synth.load_state_dict(p["synth"])
            self.synth_opt.load_state_dict(p["opt"])

    def log_scalars(self) -> dict[str, float]:
        out = super().log_scalars()
        if self.synth_mse:
            out["synthetic/mse_stage0"] = sum(self.synth_mse) / len(self.synth_mse)
            self.synth_mse = []
        return out

    def summary_figures(self) -> dict:
        return {**super().summary_figures(), "grad_clip": "each part's own gradient norm",
                "synthesiser": "zero-initialised output layer" + (", conditioned on targets" if
                                                                   self.params.conditioned else "")}

    # -- one clock tick
    def _tick(self, batch, ctx) -> dict:
        s, dev = self.part_index, ctx.device
        t0 = time.perf_counter()
        idle0 = self.idle
        if batch is not None:
            self.ids[self.injected - 1] = list(batch.cut_ids)
            self.targets[self.injected - 1] = (batch.tokens, batch.lens_on_host)
        tick = self.tick
        n_f, n_t = tick - s, tick - s - 2
        self.part.train()
        mine: dict = {"loss": None, "bad": False}
        update = False
        if self._valid(n_f):
            x, lengths = self.part_input(batch, ctx)
            tokens, host_lens = self.targets.pop(n_f)
            x_in = x.detach().requires_grad_(not self.first)
            ctx.optimizer.zero_grad(set_to_none=True)
            finite = True
            with ctx.autocast():
                y, y_lens = self.part(x_in, lengths)
            if self.last:
                loss = ctx.loss_sum(y, host_output_lengths(self.model, y_lens, host_lens), tokens) / len(tokens)
                mine["loss"] = float(loss.detach())
                finite = math.isfinite(mine["loss"])
                if finite:
                    loss.backward()
            else:
                h = y.detach().float()
                self.sends += self.send_activation(h, y_lens)
                cond = bag_of_tokens(tokens, self.model.stages[-1].output_dim, dev) if self.params.conditioned else None
                self.kept[n_f] = _Kept(h, y_lens, cond)
                with torch.no_grad():
                    g_hat = self.synth(h, frame_mask(y_lens, h.shape[1]), cond)
                finite = bool(torch.isfinite(g_hat).all())
                if finite:
                    torch.autograd.backward(y, g_hat.to(y.dtype))
            params = [p for p in self.part.parameters() if p.grad is not None]
            sq_norm = float(ctx.grad_sq_norm(params)) if params else 0.0
            if finite and (not math.isfinite(sq_norm)
                           or (not self.first and x_in.grad is not None and not bool(torch.isfinite(x_in.grad).all()))):
                finite = False
            if not self.first:
                grad_in = x_in.grad if finite and x_in.grad is not None else torch.full_like(x_in, float("nan"))
                self.sends += self.send_gradient(grad_in.detach().float())
            if finite:
                ctx.clip(params, torch.tensor(sq_norm ** 0.5, dtype=torch.float32, device=dev))
                mine["sq_norm"] = sq_norm
                update = True
            else:
                self.skipped += 1
                # counted once, where it arose: not on the parts above a non-finite activation
                mine["bad"] = self.first or bool(torch.isfinite(x).all())
                ctx.optimizer.zero_grad(set_to_none=True)
        if not self.last and self._valid(n_t):
            kept = self.kept.pop(n_t)
            target = self.recv_gradient(tuple(kept.h.shape), dev)
            if bool(torch.isfinite(target).all()):
                self._train_synthesiser(kept, target)
        self.tick += 1
        self.finish_sends(self.previous_sends)
        self.previous_sends, self.sends = self.sends, []
        self.busy += time.perf_counter() - t0 - (self.idle - idle0)
        figures = self.exchange({**mine, "staleness": 0.0})
        self.predict_control()
        if update:
            t1 = time.perf_counter()
            ctx.apply(torch.zeros(1, device=dev))
            self.version += 1
            self.delays.append((self.done_before + n_f, 0))
            del self.delays[:-1000]
            self.busy += time.perf_counter() - t1
        bad_ids = [i for p in range(self.num_parts) if figures["bad"][p] for i in self.ids.get(tick - p, [])]
        self.ids.pop(tick - (self.num_parts - 1), None)  # the last part's pass was that minibatch's last
        cut_ids = bad_ids if figures["any_bad"] else (list(batch.cut_ids) if batch is not None else [])
        return self.step_output(figures, batch.num_frames if batch is not None else 0, cut_ids)

    def _train_synthesiser(self, kept: _Kept, target: torch.Tensor) -> None:
        """One step of the synthesiser on the mean squared error over the real frames."""
        mask = frame_mask(kept.lengths, kept.h.shape[1])
        self.synth_opt.zero_grad(set_to_none=True)
        pred = self.synth(kept.h, mask, kept.cond)
        count = mask.sum().clamp(min=1) * kept.h.shape[2]
        mse = ((pred - target.to(pred.dtype) * mask[..., None]) ** 2).sum() / count
        mse.backward()
        self.synth_opt.step()
        self.synth_mse.append(float(mse.detach()))

    def _drain(self, ctx) -> list[dict]:
        outs = super()._drain(ctx)
        assert not self.kept, "synthetic_gradients: outputs left waiting for their targets"
        return outs
