"""Building blocks shared by the models."""

from __future__ import annotations

import torch
from torch import nn

from asr_parallel.models.base import Stage, linear_flops, padding_mask


def utterance_mean_norm(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Subtract each utterance's mean feature vector over its valid frames (cepstral mean
    normalisation, as Kaldi applies per speaker), and zero the padding."""
    mask = ~padding_mask(lengths, x.size(1))
    m = mask.unsqueeze(-1).to(x.dtype)
    mean = (x * m).sum(1, keepdim=True) / lengths.clamp(min=1).view(-1, 1, 1).to(x.dtype)
    return (x - mean) * m


class Splice(Stage):
    """Input stage of the frame-level DNN: mean normalisation, then each frame spliced with
    ``left`` and ``right`` neighbours (edges repeated), keeping every ``subsample``-th frame."""

    def __init__(self, input_dim: int, left: int, right: int, subsample: int):
        super().__init__()
        self.left, self.right, self.subsample = left, right, subsample
        self.output_dim = input_dim * (left + right + 1)
        self.flops_per_frame = 0.0

    def forward(self, x, lengths):
        x = utterance_mean_norm(x, lengths)
        padded = torch.cat([x[:, :1].expand(-1, self.left, -1), x, x[:, -1:].expand(-1, self.right, -1)], dim=1)
        window = padded.unfold(1, self.left + self.right + 1, 1)  # (B, T, F, W)
        spliced = window.transpose(2, 3).reshape(x.size(0), x.size(1), -1)
        return spliced[:, :: self.subsample], self.output_lengths(lengths)

    def output_lengths(self, lengths):
        return torch.div(lengths + self.subsample - 1, self.subsample, rounding_mode="floor")


class FeedForward(Stage):
    """Linear -> ReLU (or sigmoid, tanh) -> LayerNorm (-> dropout): a hidden layer of the survey's DNN."""

    ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}

    def __init__(self, input_dim: int, output_dim: int, dropout: float, frames_ratio: float,
                 activation: str = "relu"):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(input_dim, output_dim), self.ACTIVATIONS[activation](),
                                 nn.LayerNorm(output_dim), nn.Dropout(dropout))
        self.output_dim = output_dim
        self.flops_per_frame = linear_flops(input_dim, output_dim) * frames_ratio

    def forward(self, x, lengths):
        return self.net(x), lengths


class Output(Stage):
    """Final affine layer to the CTC output units."""

    def __init__(self, input_dim: int, vocab_size: int, frames_ratio: float):
        super().__init__()
        self.linear = nn.Linear(input_dim, vocab_size)
        self.output_dim = vocab_size
        self.flops_per_frame = linear_flops(input_dim, vocab_size) * frames_ratio

    def forward(self, x, lengths):
        return self.linear(x), lengths
