"""Model shapes, stage lists, output lengths and cost figures."""

import pytest
import torch

from asr_parallel.config import load_config
from asr_parallel.models import build_model

SMALL = {
    "mlp": ["model.mlp.num_layers=3", "model.mlp.hidden_dim=64"],
    "tdnn": ["model.tdnn.hidden_dim=64"],
    "tdnnf": ["model.name=tdnn", "model.tdnn.hidden_dim=64", "model.tdnn.bottleneck_dim=16"],
    "conformer": ["model.conformer.model_dim=32", "model.conformer.num_layers=2", "model.conformer.num_heads=2",
                  "model.conformer.ffn_dim=64"],
}


@pytest.mark.parametrize("name", list(SMALL))
def test_shapes_stages_and_lengths(name):
    overrides = SMALL[name] + ([f"model.name={name}"] if name in ("mlp", "tdnn", "conformer") else [])
    cfg = load_config("recipes/chime6_sim.yaml", overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, 80, 50).eval()
    lens = torch.tensor([203, 150, 61])
    feats = torch.randn(3, 203, 80)
    logits, out_lens = model(feats, lens)
    assert logits.shape[0] == 3 and logits.shape[2] == 50
    assert torch.equal(out_lens, model.output_lengths(lens))
    assert int(out_lens.max()) == logits.shape[1]
    subsampling = {"mlp": 3, "tdnn": 3, "tdnnf": 3, "conformer": 4}[name]
    assert abs(int(out_lens[0]) - 203 / subsampling) <= 2
    # The stages, applied one after another, are the model.
    x, l = feats, lens
    for stage in model.stages:
        x, l = stage(x, l)
    assert torch.allclose(x, logits) and torch.equal(l, out_lens)
    info = model.stage_info()
    assert len(info) >= 3 and info[-1].name == "output" and info[-1].output_dim == 50
    assert sum(s.params for s in info) == model.num_params()
    assert model.flops_per_frame() > 0 and all(s.flops_per_frame >= 0 for s in info)
    assert "total" in model.summary()


def test_mlp_flops_match_the_survey_formula():
    """An L-layer width-H MLP costs about 2*(L-1)*H^2 forward FLOPs per output frame (ALGORITHMS.md)."""
    cfg = load_config("recipes/chime6_sim.yaml", ["model.name=mlp", "model.mlp.num_layers=4",
                                                  "model.mlp.hidden_dim=256", "model.mlp.subsample=1",
                                                  "model.mlp.context_left=0", "model.mlp.context_right=0"])
    model = build_model(cfg.model, 80, 10)
    expected = 2 * (80 * 256 + 3 * 256 * 256 + 256 * 10)
    assert model.flops_per_frame() == expected
