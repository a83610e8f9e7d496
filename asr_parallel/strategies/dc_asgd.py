"""``dc_asgd``: asynchronous SGD with delay compensation, on the parameter server of ``async_ps``.

Zheng, Meng, Wang, Chen, Yu, Ma, Liu, "Asynchronous stochastic gradient descent with delay
compensation" (ICML 2017). A push of worker k was computed at the parameters w_bak[k] that k fetched
last, and arrives when the server holds w. The first-order Taylor correction of the gradient to w,
with the Hessian replaced by the diagonal of the gradient's outer product (its unbiased
approximation, scaled by lambda), gives the gradient the server applies:

    g_dc = g + lambda * g * g * (w - w_bak[k])          (elementwise)

then hands g_dc to the recipe's optimiser as ``async_ps`` does with g (with ``train.optimizer: sgd``
this is the paper's update; AdamW rescales the corrected gradient, so lambda's scale is then not
the paper's, and clipping uses the norm of the uncorrected push), and records w_bak[k] <- the
parameters k fetches next. ``dc_lambda`` = 0.04 is MXNet's default (``optimizer/dcasgd.py``, which
keeps one backup per weight; the paper one per worker, as here: the servers keep K copies of their
shard). Adaptive DC-ASGD-a: lambda_t = lambda / sqrt(MS_t + eps), elementwise, with the mean square
MS_t = m * MS_{t-1} + (1 - m) * g * g (m = ``mean_square_decay``, 0.95) updated by every push before
use. ``dc_lambda`` = 0 is ``async_ps`` exactly (tested against the delay simulator,
:mod:`asr_parallel.strategies.delay_sim`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asr_parallel.strategies.async_ps import AsyncPS


class DCASGD(AsyncPS):
    name = "dc_asgd"

    @dataclass
    class Params(AsyncPS.Params):
        dc_lambda: float = 0.04
        adaptive: bool = False  # DC-ASGD-a: lambda / sqrt(mean square of g)
        mean_square_decay: float = 0.95
        eps: float = 1e-7

        def __post_init__(self):
            super().__post_init__()
            if self.dc_lambda < 0:
                raise ValueError(f"strategy.dc_lambda must be >= 0, got {self.dc_lambda}")
            if not 0 <= self.mean_square_decay < 1:
                raise ValueError(f"strategy.mean_square_decay must be in [0, 1), got {self.mean_square_decay}")
            if self.push_every != self.fetch_every:
                raise ValueError("strategy dc_asgd needs push_every == fetch_every: a push must be computed at the one "
                                 "copy w_bak[k] the worker fetched")
            if self.backup_workers >= 0:
                raise ValueError("strategy dc_asgd is asynchronous: backup_workers must stay -1 (synchronous rounds "
                                 "apply gradients of the current parameters, which need no compensation)")

    def __init__(self, params, dist):
        super().__init__(params, dist)
        self.backup: dict[int, torch.Tensor] = {}  # w_bak[k] of this server's shard
        self.initial: torch.Tensor | None = None
        self.mean_square: torch.Tensor | None = None
        # how much the compensation changes the pushes: ||c|| / ||g|| of every corrected push, c the
        # correction term, over this server's shard (sum, count, max; and the ones since the last log)
        self.ratio_sum, self.ratio_n, self.ratio_max = 0.0, 0, 0.0
        self.recent_ratios: list[float] = []

    def push_basis(self, k: int):
        """w_bak[k] when worker k's push arrives: a push deferred by a pause is applied after the reply
        to it has already replaced w_bak[k] with the parameters fetched then (``on_fetch`` stores a
        new tensor, so this one is not overwritten)."""
        return self.backup.get(k, self.initial) if self.params.dc_lambda else None

    def correct(self, k: int, grad: torch.Tensor, basis=None) -> torch.Tensor:
        p = self.params
        if p.dc_lambda == 0:
            return grad
        w = self._shard_flat()
        if self.initial is None:
            self.initial = w.clone()  # (only reached before the first update: every worker starts at w0)
        w_bak = basis if basis is not None else self.backup.get(k, self.initial)
        lam: torch.Tensor | float = p.dc_lambda
        if p.adaptive:
            g2 = grad * grad
            if self.mean_square is None:
                self.mean_square = torch.zeros_like(grad)
            self.mean_square.mul_(p.mean_square_decay).add_((1 - p.mean_square_decay) * g2)
            lam = p.dc_lambda / torch.sqrt(self.mean_square + p.eps)
        correction = lam * grad * grad * (w - w_bak)
        g_norm = float(grad.norm())
        ratio = float(correction.norm()) / g_norm if g_norm > 0 else 0.0
        self.ratio_sum += ratio
        self.ratio_n += 1
        self.ratio_max = max(self.ratio_max, ratio)
        self.recent_ratios.append(ratio)
        return grad + correction

    def wrap_model(self, model):
        out = super().wrap_model(model)
        if self.is_server:
            self.initial = self._shard_flat().clone()
        return out

    def on_fetch(self, k: int, flat: torch.Tensor) -> None:
        if self.params.dc_lambda:
            self.backup[k] = flat.clone()

    def summary_figures(self) -> dict:
        out = super().summary_figures()
        if self.is_server:
            out["dc_backup_bytes"] = sum(t.numel() * t.element_size() for t in self.backup.values())
            out["dc_corrected_pushes"] = self.ratio_n
            out["dc_correction_ratio_mean"] = self.ratio_sum / self.ratio_n if self.ratio_n else 0.0
            out["dc_correction_ratio_max"] = self.ratio_max
        return out

    def log_scalars(self) -> dict[str, float]:
        out = super().log_scalars()
        if self.recent_ratios:
            out["async/dc_correction_ratio_mean"] = sum(self.recent_ratios) / len(self.recent_ratios)
            out["async/dc_correction_ratio_max"] = max(self.recent_ratios)
            self.recent_ratios = []
        return out

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["dc_asgd"] = {"backup": {str(k): v for k, v in self.backup.items()}, "initial": self.initial,
                            "mean_square": self.mean_square,
                            "ratio": [self.ratio_sum, self.ratio_n, self.ratio_max]}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        d = state["dc_asgd"]
        self.backup = {int(k): v for k, v in d["backup"].items()}
        self.initial, self.mean_square = d["initial"], d["mean_square"]
        self.ratio_sum, self.ratio_n, self.ratio_max = d.get("ratio", [0.0, 0, 0.0])  # absent before the figure
