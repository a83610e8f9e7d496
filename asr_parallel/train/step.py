"""The step context: what a strategy needs to take a training step, and nothing of the trainer's.

The trainer builds one :class:`StepContext` and hands it to the strategy (``Strategy.train_step``
for strategies that own the step; the trainer's own step uses it too), so that precision, the loss,
clipping, the skip of a bad step and the schedule live here once:

* ``autocast()``: bf16 autocast on GPU when ``train.bf16``, on CPU when ``train.bf16_cpu`` (``auto``: where
  the CPU has native bf16), else nothing;
* ``augment(feats)``: SpecAugment in training when ``train.spec_augment``;
* ``loss_sum(...)``: CTC summed over the batch (the caller divides by the utterances it averages over);
* ``clip(params, norm)``: scale gradients by min(1, grad_clip / (norm + 1e-6)), as
  ``torch.nn.utils.clip_grad_norm_`` does, for a norm computed elsewhere (over all pipeline stages);
* ``bad_flag(*tensors)``: 1.0 when any value is NaN or inf, as a (1,) tensor on the device;
* ``apply(bad)``: the optimiser step unless ``bad`` (on GPU through the fused optimiser's
  ``found_inf``, so the host never waits for the device); the caller then calls ``advance()``;
* ``advance()``: the schedule's step and the step counter.

The decision to skip is local to the rank that computes it: strategies whose ranks must agree make
every rank compute it from the same numbers (synchronous SGD: the all-reduced gradients), instead of
a collective of its own every step.
"""

from __future__ import annotations

import os
import warnings
from contextlib import nullcontext

import torch

from asr_parallel.train.loss import ctc_loss


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products in hardware (AVX512-BF16 or AMX tiles)."""
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def cpu_bf16_wanted(tc) -> bool:
    """``train.bf16_cpu`` resolved to a yes or no. ``auto`` (the default) is yes where the CPU computes
    bf16 natively (:func:`cpu_has_native_bf16`), unless the environment sets ``ASR_PARALLEL_BF16_CPU=0``
    (the test suite does, so that its exactness checks do not depend on the machine's CPU)."""
    if tc.bf16_cpu == "auto":
        return env_allows_bf16_cpu() and cpu_has_native_bf16()
    return bool(tc.bf16_cpu)


def env_allows_bf16_cpu() -> bool:
    """``ASR_PARALLEL_BF16_CPU``: unset, ``1``/``true``/``yes``/``on`` let ``auto`` choose bf16;
    ``0``/``false``/``no``/``off`` keep it float32; anything else is an error naming the variable."""
    value = os.environ.get("ASR_PARALLEL_BF16_CPU", "1").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"environment variable ASR_PARALLEL_BF16_CPU={os.environ['ASR_PARALLEL_BF16_CPU']!r}: "
                     "expected 0/false/no/off (float32) or 1/true/yes/on (bf16 where the CPU has it)")


def bf16_enabled(tc, device: torch.device) -> bool:
    """bf16 autocast for this device: ``train.bf16`` on GPU, ``train.bf16_cpu`` on CPU (emulated, and
    said so, on a CPU without native bf16: only when asked for with ``true``, never by ``auto``)."""
    if device.type == "cuda":
        return bool(tc.bf16)
    if device.type == "cpu" and cpu_bf16_wanted(tc):
        if not cpu_has_native_bf16():
            warnings.warn("train.bf16_cpu: this CPU has neither AVX512-BF16 nor AMX, so bf16 runs emulated "
                          "(usually slower than float32)", stacklevel=2)
        return True
    return False


def cpu_bf16_in_effect(tc) -> bool:
    """Whether a run of this config trains in bf16 on CPU ranks here: ``train.device`` is (or resolves
    to) the CPU and :func:`cpu_bf16_wanted`. The training fingerprint keeps this, not the setting, so
    that ``auto`` on a CPU without native bf16 fingerprints as the float32 runs of before."""
    on_cpu = tc.device == "cpu" or (tc.device == "auto" and not torch.cuda.is_available())
    return on_cpu and cpu_bf16_wanted(tc)


def set_tf32(tc, device: torch.device) -> None:
    """``train.tf32`` on GPU ranks: float32 matmuls in TF32 (10-bit mantissa products, float32
    accumulation; NVIDIA Ampere and later), i.e. what runs outside bf16 autocast, or the whole step
    with ``train.bf16: false``. cuDNN's convolutions are TF32 by torch's default whatever this says
    (``torch.backends.cudnn.allow_tf32``, left as it is). Process-wide (torch's flag), so a
    benchmark's bare loop in the same process runs in the same precision."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(tc.tf32)


class StepContext:
    def __init__(self, tc, device: torch.device, optimizer: torch.optim.Optimizer, spec_augment=None,
                 fused: bool = False):
        set_tf32(tc, device)
        self.grad_clip = float(tc.grad_clip)
        self.device = device
        self.optimizer = optimizer
        self.scheduler = None  # set by the trainer once the schedule exists
        self.spec_augment = spec_augment
        self.fused = fused  # the fused optimiser skips a step on the device (found_inf)
        self.use_bf16 = bf16_enabled(tc, device)
        self.step = 0  # optimiser steps taken (skipped ones included)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.use_bf16 else nullcontext()

    def augment(self, feats: torch.Tensor) -> torch.Tensor:
        return self.spec_augment(feats) if self.spec_augment is not None else feats

    @staticmethod
    def loss_sum(logits: torch.Tensor, out_lens: torch.Tensor, tokens: list[list[int]]) -> torch.Tensor:
        return ctc_loss(logits, out_lens, tokens)

    @staticmethod
    def grad_sq_norm(params) -> torch.Tensor:
        """Sum of the squared gradient norms of ``params`` (float32, 0-dim, on their device)."""
        grads = [p.grad.detach().float() for p in params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        return torch.stack([g.pow(2).sum() for g in grads]).sum()

    def clip(self, params, norm: torch.Tensor) -> None:
        """Scale the gradients of ``params`` so that a total norm ``norm`` becomes at most grad_clip."""
        coef = (self.grad_clip / (norm + 1e-6)).clamp(max=1.0)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.device))

    def clip_local(self, params) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(list(params), self.grad_clip)

    @staticmethod
    def bad_flag(*values: torch.Tensor) -> torch.Tensor:
        ok = torch.ones((), dtype=torch.bool, device=values[0].device)
        for v in values:
            ok = ok & torch.isfinite(v.detach()).all()
        return (~ok).float().reshape(1)

    def apply(self, bad: torch.Tensor) -> None:
        """The optimiser step unless ``bad`` (the update of one step), without the schedule."""
        opt = self.optimizer
        if self.fused:
            opt.found_inf = bad.reshape(())  # a 0-dim tensor, as the fused kernels expect
            opt.step()
        elif not bool(bad.item()):
            opt.step()

    def advance(self) -> None:
        """The schedule's step and the step counter (after the update, or for a step that made none)."""
        with warnings.catch_warnings():  # a pipeline stage may make no update while the pipeline fills
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            if self.scheduler is not None:
                self.scheduler.step()
        self.step += 1
