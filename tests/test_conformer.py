"""The conformer's convolution-module normalisation (``model.conformer.conv_norm``): with ``layer`` an
utterance's output and gradient depend on nothing else in its batch; ``batch`` is torchaudio's."""

import pytest
import torch

from asr_parallel.config import ConfigError, load_config
from asr_parallel.models import build_model

TINY = ["model.name=conformer", "model.conformer.model_dim=16", "model.conformer.num_layers=2",
        "model.conformer.num_heads=2", "model.conformer.ffn_dim=32", "model.conformer.kernel=5",
        "model.conformer.dropout=0.0"]


def tiny(conv_norm=None):
    extra = [f"model.conformer.conv_norm={conv_norm}"] if conv_norm else []
    cfg = load_config("recipes/chime6_sim.yaml", TINY + extra)
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, 80, 10)


def test_default_is_layer_norm_per_frame_and_batch_is_torchaudios():
    from asr_parallel.models.conformer import ChannelLayerNorm

    cfg, model = tiny()
    assert cfg.model.conformer.conv_norm == "layer"
    mods = list(model.modules())
    assert any(isinstance(m, ChannelLayerNorm) for m in mods)
    assert not any(isinstance(m, (torch.nn.BatchNorm1d, torch.nn.GroupNorm)) for m in mods)
    assert not [n for n, _ in model.named_buffers()]  # no running statistics
    _, legacy = tiny("batch")
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in legacy.modules()) == 2
    # The same parameter names either way (only BatchNorm's running statistics are extra).
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in legacy.named_parameters()]
    _, grouped = tiny("group")
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in grouped.modules()) == 2
    with pytest.raises(ConfigError, match="conv_norm"):
        load_config("recipes/chime6_sim.yaml", TINY + ["model.conformer.conv_norm=instance"])


def test_layer_conv_module_is_torchaudios_without_padding():
    from torchaudio.models.conformer import ConformerLayer

    _, model = tiny()
    layer = model.stages[1].layers[0]
    x = torch.randn(9, 3, 16)
    ours = layer._apply_convolution(x)  # no padding mask set: exactly torchaudio's module
    theirs = ConformerLayer._apply_convolution(layer, x)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("conv_norm, independent", [("layer", True), ("batch", False)])
def test_an_utterance_does_not_see_its_batch(conv_norm, independent):
    """Output and gradient of one utterance alone equal those it gets in a padded batch of three."""
    _, model = tiny(conv_norm)
    model.train()
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(3, 75, 80, generator=g)
    lens = torch.tensor([61, 75, 40])
    batch_feats = torch.cat([feats, torch.randn(3, 21, 80, generator=g)], 1)  # 21 more padded frames
    batch_feats[0, 61:], batch_feats[2, 40:] = 5.0, -3.0  # padding of any value
    out, out_lens = model(batch_feats, lens)
    out[0, :out_lens[0]].square().sum().backward()
    grad_batch = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone, alone_lens = model(feats[:1, :61], lens[:1])
    alone[0].square().sum().backward()
    grad_alone = [p.grad.clone() for p in model.parameters()]
    assert int(alone_lens[0]) == int(out_lens[0])
    same_out = torch.allclose(out[0, :out_lens[0]], alone[0], atol=1e-5)
    same_grad = all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grad_batch, grad_alone))
    assert same_out == independent and same_grad == independent
