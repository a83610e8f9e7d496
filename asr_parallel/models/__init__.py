"""Acoustic models: ``mlp`` (the survey's DNN), ``tdnn`` (Kaldi-like, TDNN-F optional) and
``conformer`` (torchaudio's blocks or the project's, :mod:`asr_parallel.models.conformer`). Each is an :class:`AcousticModel`, an ordered list of stages."""

from __future__ import annotations

from asr_parallel.models.base import AcousticModel, Stage, StageInfo


def build_model(cfg, input_dim: int, vocab_size: int) -> AcousticModel:
    """``cfg`` is the recipe's ``model`` section."""
    if cfg.name == "mlp":
        from asr_parallel.models.mlp import build_mlp

        m = cfg.mlp
        return build_mlp(input_dim, vocab_size, m.num_layers, m.hidden_dim, m.context_left, m.context_right,
                         m.subsample, m.dropout, m.activation)
    if cfg.name == "tdnn":
        from asr_parallel.models.tdnn import build_tdnn

        t = cfg.tdnn
        return build_tdnn(input_dim, vocab_size, t.hidden_dim, t.kernels, t.dilations, t.subsample,
                          t.subsample_layer, t.bottleneck_dim, t.dropout)
    if cfg.name == "conformer":
        from asr_parallel.models.conformer import build_conformer

        c = cfg.conformer
        return build_conformer(input_dim, vocab_size, c.model_dim, c.num_layers, c.num_heads, c.ffn_dim, c.kernel,
                               c.dropout, c.layers_per_stage, c.conv_norm, c.block)
    raise ValueError(f"unknown model '{cfg.name}'")


__all__ = ["AcousticModel", "Stage", "StageInfo", "build_model"]
