"""``conformer``: torchaudio's Conformer layers (Gulati et al., Interspeech 2020) behind a
convolutional front end that subsamples time by 4 (two 3x3 convolutions of stride 2, as in ESPnet
and icefall). The layers are grouped into stages of ``layers_per_stage`` for pipeline cuts.

The normalisation inside each layer's convolution module (after the depthwise convolution) is
``conv_norm``:

* ``layer`` (default): a LayerNorm over the channels of every frame, and the padded frames set to
  zero ahead of the depthwise convolution (as ESPnet and icefall do), so the convolution sees an
  utterance's end as the end and no value of the padding. With the front end reading only valid
  frames and attention masking padded keys, an utterance's output then depends on nothing else in
  its batch: neither the other utterances nor how far the batch is padded. This is what makes the
  micro-batch pipelines (``gpipe``, ``one_f_one_b``) compute the same update as one process.
* ``batch``: torchaudio's default BatchNorm1d, statistics over all utterances and frames of the
  batch (padding included) in training, running statistics in evaluation. The conformer
  of configs written before this option had it; such a config now gets ``layer`` unless it sets
  ``conv_norm: batch``. A micro-batch pipeline then normalises every micro-batch on its own.
* ``group``: torchaudio's GroupNorm with one group, statistics per utterance over its channels and
  all frames of the padded batch (padding included).
"""

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


CONV_NORMS = ("layer", "batch", "group")


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of every frame of a (batch, channels, time) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class Layer(ConformerLayer):
    """torchaudio's ConformerLayer with ``conv_norm`` (module docstring) in its convolution module.

    With ``layer`` the BatchNorm1d torchaudio builds is replaced by :class:`ChannelLayerNorm` (same
    parameter names: ``conv_module.sequential.3.weight`` and ``.bias``, no running statistics), and the
    convolution module's input to the depthwise convolution is zeroed at padded frames; the order of
    the modules (and so of the random draws of dropout) is torchaudio's.
    """

    def __init__(self, model_dim: int, ffn_dim: int, num_heads: int, kernel: int, dropout: float,
                 conv_norm: str = "layer"):
        if conv_norm not in CONV_NORMS:
            raise ValueError(f"model.conformer.conv_norm must be one of {', '.join(CONV_NORMS)}, got '{conv_norm}'")
        super().__init__(input_dim=model_dim, ffn_dim=ffn_dim, num_attention_heads=num_heads,
                         depthwise_conv_kernel_size=kernel, dropout=dropout, use_group_norm=conv_norm == "group")
        self.conv_norm = conv_norm
        self._pad: torch.Tensor | None = None  # (B, T) True at padded frames, during forward
        if conv_norm == "layer":
            seq = self.conv_module.sequential
            if not isinstance(seq[3], nn.BatchNorm1d):  # torchaudio's layout: conv, GLU, depthwise, norm, ...
                raise RuntimeError(f"unexpected torchaudio ConvolutionModule layout: {seq}")
            seq[3] = ChannelLayerNorm(seq[3].num_features)

    def forward(self, input: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        if self.conv_norm != "layer":
            return super().forward(input, key_padding_mask)
        self._pad = key_padding_mask
        try:
            return super().forward(input, key_padding_mask)
        finally:
            self._pad = None

    def _apply_convolution(self, input: torch.Tensor) -> torch.Tensor:
        if self.conv_norm != "layer":
            return super()._apply_convolution(input)
        module = self.conv_module
        seq = module.sequential
        x = module.layer_norm(input.transpose(0, 1)).transpose(1, 2)  # (T, B, D) -> (B, D, T)
        x = seq[1](seq[0](x))  # pointwise convolution, GLU
        if self._pad is not None:
            x = x.masked_fill(self._pad.unsqueeze(1), 0.0)
        for m in seq[2:]:  # depthwise convolution, norm, SiLU, pointwise convolution, dropout
            x = m(x)
        return input + x.permute(2, 0, 1)


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
                    ffn_dim: int, kernel: int, dropout: float, layers_per_stage: int,
                    conv_norm: str = "layer") -> AcousticModel:
    stages = [("subsampling", Conv2dSubsampling(input_dim, model_dim))]
    layers = [Layer(model_dim, ffn_dim, num_heads, kernel, dropout, conv_norm) for _ in range(num_layers)]
    for i in range(0, num_layers, layers_per_stage):
        group = layers[i:i + layers_per_stage]
        stages.append((f"conformer{i + 1}-{i + len(group)}", ConformerStage(group, model_dim, ffn_dim, kernel)))
    stages.append(("output", Output(model_dim, vocab_size, 0.25)))
    return AcousticModel(stages)
