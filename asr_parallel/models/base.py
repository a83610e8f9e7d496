"""What every acoustic model exposes to the trainer, the strategies and the cost model.

A model is an ordered list of *stages*; each stage maps ``(x, lengths)`` to ``(x, lengths)`` with
``x`` of shape (batch, time, features). Running the stages one after another is the model's forward
pass, so a pipeline strategy can cut the list across ranks. The last stage returns CTC logits over
the output units (blank is unit 0). Each stage reports its parameter count and its forward FLOPs per
input frame of the model, the figures a balanced pipeline cut and the cost model use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class StageInfo:
    name: str
    params: int
    flops_per_frame: float  # forward multiply-adds x 2, per input frame of the model
    output_dim: int


class Stage(nn.Module):
    """One contiguous piece of a model. Subclasses set ``flops_per_frame`` and ``output_dim``."""

    flops_per_frame: float = 0.0
    output_dim: int = 0

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Lengths after this stage (identity unless the stage subsamples in time)."""
        return lengths


class AcousticModel(nn.Module):
    """An ordered sequence of stages ending in CTC logits."""

    def __init__(self, stages: list[tuple[str, Stage]]):
        super().__init__()
        self.stage_names = [name for name, _ in stages]
        self.stages = nn.ModuleList([stage for _, stage in stages])

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, F) features -> (B, T', V) logits and output lengths."""
        x = feats
        for stage in self.stages:
            x, lengths = stage(x, lengths)
        return x, lengths

    def stage_info(self) -> list[StageInfo]:
        return [StageInfo(name, sum(p.numel() for p in s.parameters()), float(s.flops_per_frame), s.output_dim)
                for name, s in zip(self.stage_names, self.stages)]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_frame(self) -> float:
        """Forward FLOPs per input frame; a training step costs about three times this."""
        return sum(s.flops_per_frame for s in self.stages)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Output frames for input lengths, without running the model (for CTC length filtering)."""
        for stage in self.stages:
            lengths = stage.output_lengths(lengths)
        return lengths

    def summary(self) -> str:
        rows = [f"{'stage':24} {'params':>12} {'MFLOP/frame':>12}"]
        for s in self.stage_info():
            rows.append(f"{s.name:24} {s.params:12,d} {s.flops_per_frame / 1e6:12.2f}")
        rows.append(f"{'total':24} {self.num_params():12,d} {self.flops_per_frame() / 1e6:12.2f}")
        return "\n".join(rows)


def linear_flops(in_dim: int, out_dim: int) -> float:
    return 2.0 * in_dim * out_dim


def padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """True at padded positions, (B, T)."""
    return torch.arange(max_len, device=lengths.device)[None, :] >= lengths[:, None]
