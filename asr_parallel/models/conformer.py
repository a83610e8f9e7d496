"""``conformer``: conformer blocks (Gulati et al., Interspeech 2020) behind a convolutional front
end that subsamples time by 4 (two 3x3 convolutions of stride 2, as in ESPnet and icefall). The
blocks are grouped into stages of ``layers_per_stage`` for pipeline cuts. ``block`` chooses them:

* ``torchaudio`` (the dataclass default, so that configs from before the option keep it):
  torchaudio's ConformerLayer, which adds no positional information of its own (the attention sees
  positions only through the convolution module's padding);
* ``rotary`` (the default recipe's since 2026-12-02): this project's block (:class:`RotaryBlock`): rotary positions in the attention
  (RoFormer, Su et al. 2021), ``scaled_dot_product_attention`` with a boolean key mask, and the
  convolution module's normalisation per frame, padding zeroed; no host synchronisation and one
  graph for ``torch.compile``.

The normalisation inside each torchaudio layer's convolution module (after the depthwise convolution) is
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
import torch.nn.functional as F
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


def rotary_tables(length: int, dim: int, device, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary position embedding (RoFormer, Su et al. 2021, eq. 34): position m
    turns the i-th pair of a head's channels by the angle m * base^(-2i/dim); (length, dim / 2)."""
    inv = base ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply the rotation to (..., T, dim) queries or keys, pairing channel i with i + dim / 2 (the
    half-split layout of GPT-NeoX and LLaMA; equivalent to RoFormer's adjacent pairs up to a fixed
    permutation of the channels). The dot product of a rotated query at position m and a rotated key
    at position n then depends on m - n only: attention sees relative positions."""
    half = x.size(-1) // 2
    dtype = torch.promote_types(x.dtype, torch.float32)  # bf16 rotated in float32, float64 kept
    x1, x2 = x[..., :half].to(dtype), x[..., half:].to(dtype)
    cos, sin = cos.to(dtype), sin.to(dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class RotarySelfAttention(nn.Module):
    """Multi-head self-attention with rotary positions, through ``scaled_dot_product_attention`` with
    a boolean key mask (True: attend), so padded frames are never attended to."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads or (dim // heads) % 2:
            raise ValueError(f"model.conformer: model_dim {dim} must split into {heads} heads of an even size")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        cos, sin = rotary_tables(t, d // self.heads, x.device)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attend,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class ConvolutionModule(nn.Module):
    """The conformer's convolution module (Gulati et al. 2020, fig. 2): LayerNorm, pointwise
    convolution to 2 x channels, GLU, depthwise convolution, normalisation, SiLU, pointwise
    convolution, dropout. Padded frames are zeroed ahead of the depthwise convolution and the
    normalisation is a LayerNorm over each frame's channels, so no frame sees another utterance or
    the padding."""

    def __init__(self, dim: int, kernel: int, dropout: float):
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"model.conformer.kernel must be odd, got {kernel}")
        self.norm_in = nn.LayerNorm(dim)
        self.pointwise_in = nn.Linear(dim, 2 * dim)
        self.depthwise = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pointwise_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        y = F.glu(self.pointwise_in(self.norm_in(x)), dim=-1).masked_fill(pad.unsqueeze(-1), 0.0)
        y = self.depthwise(y.transpose(1, 2)).transpose(1, 2)
        return self.dropout(self.pointwise_out(F.silu(self.norm(y))))


class FeedForwardModule(nn.Sequential):
    """LayerNorm, linear to ``ffn_dim``, SiLU, dropout, linear back, dropout (Gulati et al. 2020)."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, ffn_dim), nn.SiLU(), nn.Dropout(dropout),
                         nn.Linear(ffn_dim, dim), nn.Dropout(dropout))


class RotaryBlock(nn.Module):
    """``block: rotary``: a conformer block of this project (Gulati et al., Interspeech 2020): half a
    feed-forward module, self-attention with rotary positions, the convolution module, half a
    feed-forward module, each with a residual connection, then a LayerNorm. Input and output are
    (batch, time, channels); ``pad`` is True at padded frames. Every operation is per frame except
    attention (masked keys) and the depthwise convolution (masked input), so an utterance's output is
    the same alone or in any batch, and nothing in it depends on a host-side value (``torch.compile``
    captures it in one graph)."""

    batch_first = True

    def __init__(self, dim: int, ffn_dim: int, heads: int, kernel: int, dropout: float):
        super().__init__()
        self.ffn1 = FeedForwardModule(dim, ffn_dim, dropout)
        self.norm_attention = nn.LayerNorm(dim)
        self.attention = RotarySelfAttention(dim, heads, dropout)
        self.dropout = nn.Dropout(dropout)
        self.conv = ConvolutionModule(dim, kernel, dropout)
        self.ffn2 = FeedForwardModule(dim, ffn_dim, dropout)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        attend = (~pad)[:, None, None, :]  # (B, 1, 1, T): every query may look at the valid keys
        x = x + 0.5 * self.ffn1(x)
        x = x + self.dropout(self.attention(self.norm_attention(x), attend))
        x = x + self.conv(x, pad)
        x = x + 0.5 * self.ffn2(x)
        return self.norm_out(x)


BLOCKS = ("torchaudio", "rotary")


class ConformerStage(Stage):
    def __init__(self, layers: list[nn.Module], model_dim: int, ffn_dim: int, kernel: int,
                 typical_frames: int = 150):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.batch_first = all(getattr(m, "batch_first", False) for m in layers)
        self.output_dim = model_dim
        d = model_dim
        per_layer = (2 * (linear_flops(d, ffn_dim) + linear_flops(ffn_dim, d))  # two feed-forward modules
                     + 4 * linear_flops(d, d) + 4 * typical_frames * d  # attention projections and scores
                     + linear_flops(d, 2 * d) + 2 * kernel * d + linear_flops(d, d))  # convolution module
        self.flops_per_frame = len(layers) * per_layer / 4

    def forward(self, x, lengths):
        mask = padding_mask(lengths, x.size(1))
        if self.batch_first:
            for layer in self.layers:
                x = layer(x, mask)
            return x, lengths
        y = x.transpose(0, 1)
        for layer in self.layers:
            y = layer(y, mask)
        return y.transpose(0, 1), lengths


def build_conformer(input_dim: int, vocab_size: int, model_dim: int, num_layers: int, num_heads: int,
                    ffn_dim: int, kernel: int, dropout: float, layers_per_stage: int,
                    conv_norm: str = "layer", block: str = "torchaudio") -> AcousticModel:
    if block not in BLOCKS:
        raise ValueError(f"model.conformer.block must be one of {', '.join(BLOCKS)}, got '{block}'")
    if block == "rotary" and conv_norm != "layer":
        raise ValueError(f"model.conformer.block rotary normalises every frame on its own (conv_norm layer); "
                         f"conv_norm {conv_norm} is torchaudio's block only")
    stages = [("subsampling", Conv2dSubsampling(input_dim, model_dim))]
    if block == "rotary":
        layers = [RotaryBlock(model_dim, ffn_dim, num_heads, kernel, dropout) for _ in range(num_layers)]
    else:
        layers = [Layer(model_dim, ffn_dim, num_heads, kernel, dropout, conv_norm) for _ in range(num_layers)]
    for i in range(0, num_layers, layers_per_stage):
        group = layers[i:i + layers_per_stage]
        stages.append((f"conformer{i + 1}-{i + len(group)}", ConformerStage(group, model_dim, ffn_dim, kernel)))
    stages.append(("output", Output(model_dim, vocab_size, 0.25)))
    return AcousticModel(stages)
