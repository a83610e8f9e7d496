"""``tdnn``: a Kaldi-like time-delay neural network (Peddinti, Povey, Khudanpur, Interspeech 2015),
optionally factored as TDNN-F (Povey et al., Interspeech 2018: each layer's weight matrix is the
product of two smaller ones through a linear bottleneck, with a skip connection).

Layers are 1-d convolutions over time: layer i has a context of ``kernel`` frames spaced
``dilation`` apart, and the layer ``subsample_layer`` strides by ``subsample`` (frame subsampling,
3 in Kaldi's chain models), so later contexts are counted in output frames."""

from __future__ import annotations

import torch
from torch import nn

from asr_parallel.models.base import AcousticModel, Stage, linear_flops
from asr_parallel.models.layers import Output, utterance_mean_norm


class TdnnLayer(Stage):
    def __init__(self, input_dim: int, hidden_dim: int, kernel: int, dilation: int, stride: int,
                 bottleneck_dim: int, dropout: float, frames_ratio: float, input_norm: bool = False):
        super().__init__()
        self.kernel, self.dilation, self.stride = kernel, dilation, stride
        self.input_norm = input_norm
        pad = dilation * (kernel - 1) // 2
        if bottleneck_dim:
            # TDNN-F: the temporal convolution into a bottleneck, then an affine map back up.
            self.conv = nn.Sequential(
                nn.Conv1d(input_dim, bottleneck_dim, kernel, stride=stride, dilation=dilation, padding=pad, bias=False),
                nn.Conv1d(bottleneck_dim, hidden_dim, 1),
            )
            conv_flops = linear_flops(input_dim * kernel, bottleneck_dim) + linear_flops(bottleneck_dim, hidden_dim)
        else:
            self.conv = nn.Conv1d(input_dim, hidden_dim, kernel, stride=stride, dilation=dilation, padding=pad)
            conv_flops = linear_flops(input_dim * kernel, hidden_dim)
        self.skip = bool(bottleneck_dim) and input_dim == hidden_dim and stride == 1
        self.post = nn.Sequential(nn.ReLU(), nn.LayerNorm(hidden_dim), nn.Dropout(dropout))
        self.output_dim = hidden_dim
        self.flops_per_frame = conv_flops * frames_ratio / stride

    def forward(self, x, lengths):
        if self.input_norm:
            x = utterance_mean_norm(x, lengths)
        y = self.post(self.conv(x.transpose(1, 2)).transpose(1, 2))
        if self.skip:
            y = y + x
        return y, self.output_lengths(lengths)

    def output_lengths(self, lengths):
        if self.stride == 1:
            return lengths
        span = self.dilation * (self.kernel - 1)
        pad = span // 2
        return torch.div(lengths + 2 * pad - span - 1, self.stride, rounding_mode="floor") + 1


def build_tdnn(input_dim: int, vocab_size: int, hidden_dim: int, kernels: list[int], dilations: list[int],
               subsample: int, subsample_layer: int, bottleneck_dim: int, dropout: float) -> AcousticModel:
    if len(kernels) != len(dilations):
        raise ValueError("model.kernels and model.dilations must have one entry per layer")
    stages, dim, ratio = [], input_dim, 1.0
    for i, (k, d) in enumerate(zip(kernels, dilations)):
        stride = subsample if i == subsample_layer else 1
        layer = TdnnLayer(dim, hidden_dim, k, d, stride, bottleneck_dim if i > 0 else 0, dropout, ratio,
                          input_norm=(i == 0))
        stages.append((f"tdnn{i + 1}", layer))
        ratio /= stride
        dim = hidden_dim
    stages.append(("output", Output(dim, vocab_size, ratio)))
    return AcousticModel(stages)
