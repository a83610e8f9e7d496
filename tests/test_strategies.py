"""Data-parallel strategies on 2 gloo ranks (4 for hierarchical) against their definitions.

Every strategy runs through the project's trainer (``Trainer.train_step``) on a toy model with plain
SGD; the results are compared with an independent single-process computation of its update rule,
with one another where the rules coincide, with an uninterrupted run after a resume in the middle
of a block, and with the cost model's bytes.
"""

import pytest
import torch

from strategy_harness import CONFORMER, MLP, SGD, config, flat_state, reference, run_ranks

ATOL = 1e-5  # float32 rounding of sums taken in another order, over 8 steps
ADAM = [o for o in SGD if not o.startswith("train.optimizer")] + ["train.optimizer=adam"]

SCENARIOS = {  # name: (strategy, steps, resume after, model, train options)
    "sync": ({"name": "sync_sgd"}, 4, None, MLP, SGD),
    "ma1": ({"name": "model_averaging", "sync_period": 1}, 4, None, MLP, SGD),
    "ma3": ({"name": "model_averaging", "sync_period": 3}, 7, None, MLP, SGD),
    "bmuf_as_ma": ({"name": "bmuf", "sync_period": 3, "block_momentum": 0.0, "block_lr": 1.0, "warmup_steps": 0},
                   7, None, MLP, SGD),
    "bmuf_cbm": ({"name": "bmuf", "sync_period": 2, "block_momentum": 0.5, "block_lr": 1.3, "warmup_steps": 1},
                 8, None, MLP, SGD),
    "bmuf_nbm": ({"name": "bmuf", "sync_period": 2, "block_momentum": 0.5, "block_lr": 1.3, "warmup_steps": 1,
                  "nesterov": True}, 8, None, MLP, SGD),
    "easgd": ({"name": "easgd", "sync_period": 2, "beta": 0.9}, 7, None, MLP, SGD),
    # Resumed in the middle of a block (after step 4: blocks end after steps 3, 5, 7 / 2, 4, 6).
    "bmuf_nbm_resumed": ({"name": "bmuf", "sync_period": 2, "block_momentum": 0.5, "block_lr": 1.3,
                          "warmup_steps": 1, "nesterov": True}, 8, 4, MLP, SGD),
    "ma3_resumed": ({"name": "model_averaging", "sync_period": 3}, 7, 4, MLP, SGD),
    "easgd_resumed": ({"name": "easgd", "sync_period": 2, "beta": 0.9}, 7, 3, MLP, SGD),
    # Batch-norm buffers and Adam moments averaged too; resumed mid-block with Adam state.
    "ma_state": ({"name": "model_averaging", "sync_period": 2, "average_optimizer_state": True}, 4, None,
                 CONFORMER, ADAM),
    "ma_state_resumed": ({"name": "model_averaging", "sync_period": 2, "average_optimizer_state": True}, 4, 3,
                         CONFORMER, ADAM),
    "bmuf_conformer": ({"name": "bmuf", "sync_period": 2, "warmup_steps": 1, "block_momentum": 0.5}, 5, None,
                       CONFORMER, ADAM),
}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ranks(2, SCENARIOS, tmp_path_factory.mktemp("strategies"))


def local(results, name, rank=0):
    return flat_state(results[rank][name]["local"], config({"name": "single"}, SCENARIOS[name][3]))


def evaluated(results, name, rank=0):
    return flat_state(results[rank][name]["eval"], config({"name": "single"}, SCENARIOS[name][3]))


def close(a, b):
    if not torch.allclose(a, b, atol=ATOL, rtol=1e-5):
        print("max abs difference", (a - b).abs().max().item(), "scale", b.abs().max().item())
        return False
    return True


def test_sync_sgd_through_trainer_matches_definition(two_ranks):
    ref = reference(config({"name": "single"}), [[0], [1]], 4, "sync")
    assert close(local(two_ranks, "sync"), ref["locals"][0])


def test_model_averaging_tau1_equals_sync_sgd(two_ranks):
    for rank in (0, 1):
        assert close(local(two_ranks, "ma1", rank), local(two_ranks, "sync", rank))


def test_model_averaging_matches_definition(two_ranks):
    ref = reference(config({"name": "single"}), [[0], [1]], 7, "average", tau=3)
    for rank in (0, 1):  # step 7 is one step past the second averaging: local models differ
        assert close(local(two_ranks, "ma3", rank), ref["locals"][rank])
    assert not close(local(two_ranks, "ma3", 0), local(two_ranks, "ma3", 1))
    assert close(evaluated(two_ranks, "ma3"), ref["global"])  # the model averaged after step 6


def test_bmuf_without_momentum_equals_model_averaging(two_ranks):
    for rank in (0, 1):
        assert close(local(two_ranks, "bmuf_as_ma", rank), local(two_ranks, "ma3", rank))
    assert close(evaluated(two_ranks, "bmuf_as_ma"), evaluated(two_ranks, "ma3"))


@pytest.mark.parametrize("name, nesterov", [("bmuf_cbm", False), ("bmuf_nbm", True)])
def test_bmuf_matches_formulas(two_ranks, name, nesterov):
    ref = reference(config({"name": "single"}), [[0], [1]], 8, "bmuf", tau=2, warmup=1, eta=0.5, zeta=1.3,
                    nesterov=nesterov)
    for rank in (0, 1):
        state = two_ranks[rank][name]["strategy"]
        assert close(state["block_momentum"], ref["delta"])
        assert close(state["reference"], ref["reference"])
        assert close(evaluated(two_ranks, name, rank), ref["global"])
        assert close(local(two_ranks, name, rank), ref["locals"][rank])
    assert ref["delta"].abs().sum() > 0
    if nesterov:  # the next block starts from the Nesterov-shifted point, not from the global model
        assert not close(ref["reference"], ref["global"])


def test_easgd_matches_formulas(two_ranks):
    ref = reference(config({"name": "single"}), [[0], [1]], 7, "easgd", tau=2, beta=0.9)
    for rank in (0, 1):
        assert close(local(two_ranks, "easgd", rank), ref["locals"][rank])
        assert close(evaluated(two_ranks, "easgd", rank), ref["global"])
    assert not close(ref["locals"][0], ref["global"])


@pytest.mark.parametrize("name", ["bmuf_nbm", "ma3", "easgd", "ma_state"])
def test_resume_mid_block_restores_strategy_state(two_ranks, name):
    for rank in (0, 1):
        a, b = two_ranks[rank][name], two_ranks[rank][name + "_resumed"]
        for key, value in a["local"].items():
            assert torch.equal(value, b["local"][key]), key
        for key, value in a["eval"].items():
            assert torch.equal(value, b["eval"][key]), key
        for key in ("reference", "block_momentum"):
            if key in a["strategy"]:
                assert torch.equal(a["strategy"][key], b["strategy"][key])
        assert a["comm"] == b["comm"]


def test_buffers_and_optimizer_state_are_averaged(two_ranks):
    # After step 4 (an averaging step) both ranks hold the same parameters and batch-norm statistics.
    r0, r1 = two_ranks[0]["ma_state"]["local"], two_ranks[1]["ma_state"]["local"]
    assert any("running_mean" in k for k in r0)
    for key in r0:
        assert torch.allclose(r0[key].float(), r1[key].float(), atol=1e-6), key
    assert "state" in two_ranks[0]["ma_state"]["comm"]["by_label"]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_measured_bytes_equal_cost_model(two_ranks, name):
    from asr_parallel.strategies.cost import ModelSize, predict

    for rank in (0, 1):
        res = two_ranks[rank][name]
        predicted = predict(SCENARIOS[name][0], ModelSize(*res["size"]), 2, res["steps"])
        measured = res["comm"]
        assert measured["bytes_sent"] > 0
        assert abs(measured["bytes_sent"] - predicted["bytes_sent"]) <= 0.01 * predicted["bytes_sent"]
        if name != "sync":  # DDP's buckets set the number of calls; the bytes agree all the same
            assert measured["calls"] == predicted["calls"]
            assert measured["by_label"] == predicted["by_label"]


HIER = {
    "hier_ma": ({"name": "hierarchical", "group_size": 2, "outer": "model_averaging", "sync_period": 2}, 5, None,
                MLP, SGD),
    "hier_bmuf": ({"name": "hierarchical", "group_size": 2, "outer": "bmuf", "sync_period": 2,
                   "block_momentum": 0.5, "block_lr": 1.2, "warmup_steps": 1}, 6, 3, MLP, SGD),
}


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return run_ranks(4, HIER, tmp_path_factory.mktemp("hierarchical"))


def test_hierarchical_matches_definition(four_ranks):
    """Groups {0, 1} and {2, 3} train by synchronous SGD; the groups average or run BMUF every 2 steps."""
    from asr_parallel.strategies.cost import ModelSize, predict

    cfg = config({"name": "single"})
    refs = {"hier_ma": reference(cfg, [[0, 1], [2, 3]], 5, "average", tau=2),
            "hier_bmuf": reference(cfg, [[0, 1], [2, 3]], 6, "bmuf", tau=2, warmup=1, eta=0.5, zeta=1.2)}
    for name, ref in refs.items():
        for rank in range(4):
            res = four_ranks[rank][name]
            assert close(flat_state(res["local"], cfg), ref["locals"][rank // 2]), (name, rank)
            assert close(flat_state(res["eval"], cfg), ref["global"]), (name, rank)
            predicted = predict(HIER[name][0], ModelSize(*res["size"]), 4, res["steps"])
            assert predicted["by_label"]["inter"][1] == res["comm"]["by_label"]["inter"][1]
            assert predicted["by_label"]["inter"][0] == res["comm"]["by_label"]["inter"][0]
            assert abs(res["comm"]["bytes_sent"] - predicted["bytes_sent"]) <= 0.01 * predicted["bytes_sent"]
    assert not close(refs["hier_ma"]["locals"][0], refs["hier_ma"]["locals"][1])


def test_cost_model_hand_computed():
    from asr_parallel.strategies.cost import ModelSize, predict

    size = ModelSize(params=1000, buffers=10, optimizer_state=2000)
    # Ring all-reduce over K = 4: 2 * 3/4 * n * 4 bytes = 6 n bytes.
    assert predict({"name": "sync_sgd"}, size, 4, 100)["bytes_sent"] == 100 * 6000
    ma = predict({"name": "model_averaging", "sync_period": 10, "average_optimizer_state": True}, size, 4, 105)
    assert ma["by_label"] == {"params": [10 * 6000, 10], "state": [10 * 6 * 2010, 10]}
    bmuf = predict({"name": "bmuf", "sync_period": 10, "warmup_steps": 30}, size, 4, 105)
    assert bmuf["by_label"] == {"gradients": [30 * 6000, 30], "params": [7 * 6 * 1010, 7]}
    # 8 ranks in 2 groups of 4: DDP inside (6 n bytes a step), averaging across 2 (4 n bytes).
    hier = predict({"name": "hierarchical", "group_size": 4, "sync_period": 5}, ModelSize(params=1000), 8, 20)
    assert hier["by_label"] == {"intra": [20 * 6000, 20], "inter": [4 * 4000, 4]}
    assert predict({"name": "easgd"}, size, 1, 100)["bytes_sent"] == 0


def test_run_names_carry_strategy_and_parameters():
    from asr_parallel.strategies import run_name

    assert run_name({"name": "bmuf", "sync_period": 20, "nesterov": True}) == "bmuf_nesterovTrue_sync_period20"
    assert run_name({"name": "sync_sgd"}) == "sync_sgd"


def test_strategy_parameter_errors():
    from asr_parallel.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="valid parameters: beta, sync_period"):
        load_config("recipes/chime6_sim.yaml", ["strategy.name=easgd", "strategy.alpha=0.1"])
    with pytest.raises(ConfigError, match="valid strategies: bmuf, easgd, gpipe, hierarchical, model_averaging, one_f_one_b, pipelined_bp"):
        load_config("recipes/chime6_sim.yaml", ["strategy.name=bmfu"])
    with pytest.raises(ConfigError, match="block_momentum must be in"):
        load_config("recipes/chime6_sim.yaml", ["strategy.name=bmuf", "strategy.block_momentum=1.0"])
    with pytest.raises(ConfigError, match="sync_period must be >= 1"):
        load_config("recipes/chime6_sim.yaml", ["strategy.name=model_averaging", "strategy.sync_period=0"])
