"""``conformer``: torchaudio's Conformer layers (Gulati et al., Interspeech 2020) behind a
convolutional front end that subsamples time by 4 (two 3x3 convolutions of stride 2, as in ESPnet
and icefall). The layers are grouped into stages of ``layers_per_stage`` for pipeline cuts."""

from __future__ import annotations

import torch
from torch import nn
from torchaudio.models.conformer import ConformerLayer

from asr_parallel.models.base import AcousticModel, Stage, linear_flops, padding_mask
from asr_parallel.models.layers import Output, utterance_mean_norm


class Conv2dSubsampling(Stage):
    def __init__(self, input_dim: int, model_dim: int, channels: int = 64):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, channels, 3, stride=2), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, stride=2), nn.ReLU())
        freq = ((input_dim - 1) // 2 - 1) // 2
        self.out = nn.Linear(channels * freq, model_dim)
        self.output_dim = model_dim
        # per input frame: conv1 at 1/2 rate over F/2 bins, conv2 at 1/4 rate over F/4 bins, linear at 1/4
        self.flops_per_frame = (2 * 9 * channels * (input_dim / 2) / 2
                                + 2 * 9 * channels * channels * freq / 4
                                + linear_flops(channels * freq, model_dim) / 4)

    def forward(self, x, lengths):
        x = utterance_mean_norm(x, lengths)
        y = self.conv(x.unsqueeze(1))  # (B, C, T', F')
        b, c, t, f = y.shape
        return self.out(y.permute(0, 2, 1, 3).reshape(b, t, c * f)), self.output_lengths(lengths)

    def output_lengths(self, lengths):
        return torch.div(torch.div(lengths - 1, 2, rounding_mode="floor") - 1, 2, rounding_mode="floor")


class ConformerStage(Stage):
    def __init__(self, layers: list[ConformerLayer], model_dim: int, ffn_dim: int, kernel: int,
                 typical_frames: int = 150):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.output_dim = model_dim
        d = model_dim
        per_layer = (2 * (linear_flops(d, ffn_dim) + linear_flops(ffn_dim, d))  # two feed-forward modules
                     + 4 * linear_flops(d, d) + 4 * typical_frames * d  # attention projections and scores
                     + linear_flops(d, 2 * d) + 2 * kernel * d + linear_flops(d, d))  # convolution module
        self.flops_per_frame = len(layers) * per_layer / 4

    def forward(self, x, lengths):
        mask = padding_mask(lengths, x.size(1))
        y = x.transpose(0, 1)
        for layer in self.layers:
            y = layer(y, mask)
        return y.transpose(0, 1), lengths


def build_conformer(input_dim: int, vocab_size: int, model_dim: int, num_layers: int, num_heads: int,
                    ffn_dim: int, kernel: int, dropout: float, layers_per_stage: int) -> AcousticModel:
    stages = [("subsampling", Conv2dSubsampling(input_dim, model_dim))]
    layers = [ConformerLayer(input_dim=model_dim, ffn_dim=ffn_dim, num_attention_heads=num_heads,
                             depthwise_conv_kernel_size=kernel, dropout=dropout) for _ in range(num_layers)]
    for i in range(0, num_layers, layers_per_stage):
        group = layers[i:i + layers_per_stage]
        stages.append((f"conformer{i + 1}-{i + len(group)}", ConformerStage(group, model_dim, ffn_dim, kernel)))
    stages.append(("output", Output(model_dim, vocab_size, 0.25)))
    return AcousticModel(stages)
