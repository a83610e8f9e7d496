"""The conformer's convolution-module normalisation (``model.conformer.conv_norm``): with ``layer`` an
utterance's output and gradient depend on nothing else in its batch; ``batch`` is torchaudio's."""

import pytest
import torch

from asr_parallel.config import ConfigError, load_config
from asr_parallel.models import build_model

TINY = ["model.name=conformer", "model.conformer.block=torchaudio", "model.conformer.model_dim=16", "model.conformer.num_layers=2",
        "model.conformer.num_heads=2", "model.conformer.ffn_dim=32", "model.conformer.kernel=5",
        "model.conformer.dropout=0.0"]


def tiny(conv_norm=None, block=None):
    extra = [f"model.conformer.conv_norm={conv_norm}"] if conv_norm else []
    extra += [f"model.conformer.block={block}"] if block else []
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


@pytest.mark.parametrize("conv_norm, block, independent", [("layer", None, True), ("batch", None, False),
                                                            (None, "rotary", True)])
def test_an_utterance_does_not_see_its_batch(conv_norm, block, independent):
    """Output and gradient of one utterance alone equal those it gets in a padded batch of three."""
    _, model = tiny(conv_norm, block)
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


def test_rotary_attention_sees_relative_positions():
    """Rotated queries and keys (RoFormer): the score of a query at position m and a key at n
    depends on m - n only, and the rotation keeps each vector's norm."""
    from asr_parallel.models.conformer import rotary_tables, rotate

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=g), torch.randn(8, generator=g)
    cos, sin = rotary_tables(40, 8, "cpu")

    def score(m, n):
        return float(rotate(q, cos[m], sin[m]) @ rotate(k, cos[n], sin[n]))

    assert score(3, 1) == pytest.approx(score(30, 28), abs=1e-5)
    assert score(5, 9) == pytest.approx(score(20, 24), abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)  # but it does see the offset
    assert float(rotate(q, cos[17], sin[17]).norm()) == pytest.approx(float(q.norm()), rel=1e-6)


def test_rotary_block_knows_where_a_frame_is():
    """torchaudio's block has no positional encoding: without the convolution module's edges, its
    attention output is the same for a sequence and its reversal (permutation equivariance); the
    rotary block's is not. Tested on the attention sub-module of each."""
    from asr_parallel.models.conformer import RotarySelfAttention

    torch.manual_seed(0)
    x = torch.randn(1, 12, 16)
    attend = torch.ones(1, 1, 1, 12, dtype=torch.bool)
    rotary = RotarySelfAttention(16, 2, 0.0).eval()
    plain = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    flip = torch.arange(11, -1, -1)
    y = plain(x, x, x, need_weights=False)[0]
    assert torch.allclose(plain(x[:, flip], x[:, flip], x[:, flip], need_weights=False)[0], y[:, flip], atol=1e-5)
    assert not torch.allclose(rotary(x[:, flip], attend), rotary(x, attend)[:, flip], atol=1e-3)


def test_rotary_attention_is_unchanged_by_masked_frames_ahead():
    """Queries and keys rotated alike: frames put ahead of a sequence and masked out shift every
    position by the same amount, so the valid frames' attention output is unchanged (it would not be
    if only the queries or only the keys were rotated, or with absolute positions)."""
    from asr_parallel.models.conformer import RotarySelfAttention

    torch.manual_seed(0)
    att = RotarySelfAttention(16, 2, 0.0).eval()
    x = torch.randn(1, 10, 16)
    y = att(x, torch.ones(1, 1, 1, 10, dtype=torch.bool))
    shifted = torch.cat([torch.randn(1, 7, 16), x], dim=1)
    attend = torch.ones(1, 1, 1, 17, dtype=torch.bool)
    attend[..., :7] = False
    assert torch.allclose(att(shifted, attend)[:, 7:], y, atol=1e-5)


def test_rotary_block_rejects_batch_statistics_and_odd_heads():
    with pytest.raises(ConfigError, match="conv_norm"):
        load_config("recipes/chime6_sim.yaml", TINY + ["model.conformer.block=rotary", "model.conformer.conv_norm=batch"])
    with pytest.raises(ConfigError, match="must divide"):
        load_config("recipes/chime6_sim.yaml", TINY + ["model.conformer.num_heads=3"])
    with pytest.raises(ConfigError, match="even size"):  # 24 / 8: heads of 3 channels
        load_config("recipes/chime6_sim.yaml", TINY + ["model.conformer.block=rotary", "model.conformer.model_dim=24",
                                                       "model.conformer.num_heads=8"])
    load_config("recipes/chime6_sim.yaml", TINY + ["model.conformer.model_dim=24", "model.conformer.num_heads=8"])
    # another model's run does not check the conformer's settings
    load_config("recipes/chime6_sim.yaml", TINY + ["model.conformer.num_heads=3", "model.name=mlp"])
    with pytest.raises(ConfigError, match="block"):
        load_config("recipes/chime6_sim.yaml", TINY + ["model.conformer.block=relative"])


def test_rotary_conformer_compiles_into_one_graph_and_trains_the_same():
    """The rotary conformer under ``torch.compile(fullgraph=True)`` (no graph break: no host-side
    value in its forward pass), here with the aot_eager backend (the captured forward and backward
    graphs run by eager kernels; inductor's code generation is the GPU script's), gives the eager
    model's loss and gradients on a padded batch."""
    from asr_parallel.train.loss import ctc_loss

    _, model = tiny(block="rotary")
    model.train()
    g = torch.Generator().manual_seed(3)
    feats, lens = torch.randn(2, 60, 80, generator=g), torch.tensor([60, 47])
    tokens = [[1, 4, 2, 7, 3], [5, 5, 9, 2]]

    def step(fn):
        model.zero_grad()
        logits, out_lens = fn(feats, lens)
        loss = ctc_loss(logits, out_lens, tokens)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    eager_loss, eager_grads = step(model)
    loss, grads = step(compiled)
    assert torch.allclose(loss, eager_loss, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, eager_grads))
