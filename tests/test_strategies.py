"""Data-parallel strategies on 2 gloo ranks (4 for hierarchical) against their definitions.

Every strategy runs through the project's trainer (``Trainer.train_step``) on a toy model with plain
SGD; the results are compared with an independent single-process computation of its update rule,
with one another where the rules coincide, with an uninterrupted run after a resume in the middle
of a block, and with the cost model's bytes.
"""

import pytest
import torch

from strategy_harness import (CONFORMER_BN, LR, MLP, SGD, batch, build, config, flat, flat_state, gradient,
                              load_flat, reference, run_ranks)

ATOL = 1e-5  # float32 rounding of sums taken in another order, over 8 steps
ADAM = [o for o in SGD if not o.startswith("train.optimizer")] + ["train.optimizer=adam"]

SCENARIOS = {  # name: (strategy, steps, resume after, model, train options)
    "sync": ({"name": "sync_sgd"}, 4, None, MLP, SGD),
    "sync_uneven": ({"name": "sync_sgd"}, 4, None, MLP, SGD, "uneven"),  # 2 and 3 utterances per rank
    "ma1": ({"name": "model_averaging", "sync_period": 1}, 4, None, MLP, SGD),
    "ma3": ({"name": "model_averaging", "sync_period": 3}, 7, None, MLP, SGD),
    "bmuf_as_ma": ({"name": "bmuf", "sync_period": 3, "block_momentum": 0.0, "block_lr": 1.0, "warmup_steps": 0},
                   7, None, MLP, SGD),
    "bmuf_cbm": ({"name": "bmuf", "sync_period": 2, "block_momentum": 0.5, "block_lr": 1.3, "warmup_steps": 1},
                 8, None, MLP, SGD),
    "bmuf_sync_warmup": ({"name": "bmuf", "sync_period": 2, "block_momentum": 0.5, "block_lr": 1.3,
                          "warmup_steps": 2, "warmup": "sync"}, 8, None, MLP, SGD),
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
                 CONFORMER_BN, ADAM),
    "ma_state_resumed": ({"name": "model_averaging", "sync_period": 2, "average_optimizer_state": True}, 4, 3,
                         CONFORMER_BN, ADAM),
    "bmuf_conformer": ({"name": "bmuf", "sync_period": 2, "warmup_steps": 1, "block_momentum": 0.5}, 5, None,
                       CONFORMER_BN, ADAM),
    "bmuf_bn_sync_warmup": ({"name": "bmuf", "sync_period": 2, "warmup_steps": 2, "warmup": "sync",
                             "block_momentum": 0.5}, 3, None, CONFORMER_BN, ADAM),
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


def test_sync_sgd_averages_the_loss_over_all_ranks_utterances(two_ranks):
    """Ranks with 2 and 3 utterances: the update is that of one process on the union batch (the summed
    loss divided by all 5 utterances), not the mean of the two ranks' means."""
    cfg = config({"name": "single"})
    union, mean_of_means = build(cfg), build(cfg)
    for s in range(1, 5):
        b0, b1 = batch(s, 0, True), batch(s, 1, True)
        n = len(b0.tokens) + len(b1.tokens)
        assert len(b0.tokens) != len(b1.tokens)
        load_flat(union, flat(union) - LR * (gradient(union, b0, n) + gradient(union, b1, n)))
        load_flat(mean_of_means, flat(mean_of_means) - LR * (gradient(mean_of_means, b0) + gradient(mean_of_means, b1)) / 2)
    for rank in (0, 1):
        assert close(local(two_ranks, "sync_uneven", rank), flat(union))
    assert not close(flat(union), flat(mean_of_means))


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


@pytest.mark.parametrize("name, nesterov, warmup, mode", [("bmuf_cbm", False, 1, "local_broadcast"),
                                                         ("bmuf_nbm", True, 1, "local_broadcast"),
                                                         ("bmuf_sync_warmup", False, 2, "sync")])
def test_bmuf_matches_formulas(two_ranks, name, nesterov, warmup, mode):
    """fairseq's warm-up (local steps, then rank 0's model everywhere) and the synchronous one."""
    ref = reference(config({"name": "single"}), [[0], [1]], 8, "bmuf", tau=2, warmup=warmup, eta=0.5, zeta=1.3,
                    nesterov=nesterov, warmup_mode=mode)
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
        assert a["buckets"] == b["buckets"]  # a warm-up's DDP buckets as it used them, resumed or not
        for key, value in a["local"].items():
            assert torch.equal(value, b["local"][key]), key
        for key, value in a["eval"].items():
            assert torch.equal(value, b["eval"][key]), key
        for key in ("reference", "block_momentum"):
            if key in a["strategy"]:
                assert torch.equal(a["strategy"][key], b["strategy"][key])
        # the resumed run's counts: the first process's, and the second one's own start on top
        from asr_parallel.strategies.base import CommCounter

        expected = CommCounter()
        expected.load_state_dict(a["comm"])
        expected.merge(b["resume_setup"])
        assert b["comm"] == expected.state_dict()


def assert_buffers_averaged(results: list[dict], name: str, steps: list[int]) -> None:
    """At each of ``steps`` every rank's float buffers (batch-norm statistics) ended the step as the
    mean over all ranks of what the averaging found on them, and the ranks had found different ones
    (so agreement alone, e.g. rank 0's copy, would not pass)."""
    recs = [r[name]["averaged_buffers"] for r in results]
    assert [s for s, _, _ in recs[0]] == steps
    for i in range(len(steps)):
        found = [rec[i][1] for rec in recs]
        assert found[0] and any(not torch.equal(a, b) for a, b in zip(found[0], found[1]))
        for j in range(len(found[0])):
            mean = sum(f[j] for f in found) / len(found)
            for rank, rec in enumerate(recs):
                assert torch.allclose(rec[i][2][j], mean, atol=1e-6), (steps[i], rank, j)


def test_batch_norm_statistics_are_averaged_after_a_synchronous_warm_up(two_ranks):
    """DDP keeps the parameters of the warm-up equal but not the batch-norm statistics; at the end of
    the warm-up (step 2) they become their mean over the ranks, so the global model is the same on both."""
    assert_buffers_averaged(two_ranks, "bmuf_bn_sync_warmup", [2])
    e0, e1 = two_ranks[0]["bmuf_bn_sync_warmup"]["eval"], two_ranks[1]["bmuf_bn_sync_warmup"]["eval"]
    assert [k for k in e0 if "running_mean" in k]
    for k in e0:
        assert torch.allclose(e0[k].float(), e1[k].float(), atol=1e-6), k


def test_fairseq_warm_up_restarts_the_optimiser_state(two_ranks):
    """BMUF's local warm-up (1 step) ends with rank 0's model broadcast and Adam's state cleared
    (fairseq), so after 5 steps Adam has counted 4; the synchronous warm-up keeps it (3 of 3)."""
    assert two_ranks[0]["bmuf_conformer"]["optimizer_steps"] == 4
    assert two_ranks[1]["bmuf_conformer"]["optimizer_steps"] == 4
    assert two_ranks[0]["bmuf_bn_sync_warmup"]["optimizer_steps"] == 3


def test_buffers_and_optimizer_state_are_averaged(two_ranks):
    # After step 4 (an averaging step) both ranks hold the same parameters and batch-norm statistics.
    assert_buffers_averaged(two_ranks, "ma_state", [2, 4])
    r0, r1 = two_ranks[0]["ma_state"]["local"], two_ranks[1]["ma_state"]["local"]
    assert any("running_mean" in k for k in r0)
    for key in r0:
        assert torch.allclose(r0[key].float(), r1[key].float(), atol=1e-6), key
    # One all-reduce per synchronisation (after steps 2 and 4) carries parameters, buffers, Adam's two
    # moments and the bad-step count: on 2 ranks n values of 4 bytes each.
    params, buffers, state, _ = two_ranks[0]["ma_state"]["size"]
    assert state == 2 * params
    assert two_ranks[0]["ma_state"]["comm"]["by_label"]["params"] == [2 * 4 * (params + buffers + state + 1), 2]


@pytest.mark.parametrize("name", [n for n in SCENARIOS if "resumed" not in n])
def test_every_call_is_counted(two_ranks, name):
    """Step by step, the calls the strategy counted equal the process group's own count (its sequence
    number, which gloo advances at every collective, send and receive: DDP's internal calls too)."""
    for rank in (0, 1):
        calls = two_ranks[rank][name]["calls"]
        counted = [b[0] - a[0] for a, b in zip(calls, calls[1:])]
        measured = [b[1] - a[1] for a, b in zip(calls, calls[1:])]
        assert counted == measured, (rank, counted, measured)


def test_model_averaging_makes_no_call_between_synchronisations(two_ranks):
    """tau = 3 over 7 steps: one all-reduce after steps 3 and 6 (parameters, buffers and the bad-step
    count together), and nothing at all at the other steps, by the process group's own count."""
    for rank in (0, 1):
        calls = two_ranks[rank]["ma3"]["calls"]
        measured = [b[1] - a[1] for a, b in zip(calls, calls[1:])]
        assert measured == [0, 0, 1, 0, 0, 1, 0]


@pytest.mark.parametrize("name", [n for n in SCENARIOS if "resumed" not in n])
def test_counted_bytes_equal_cost_model(two_ranks, name):
    """The formula per counted call, summed, equals the cost model's total for the run (DDP's set-up
    is counted but not modelled; a resumed run's second start is checked by the resume test)."""
    from asr_parallel.strategies.cost import ModelSize, predict

    for rank in (0, 1):
        res = two_ranks[rank][name]
        size = ModelSize(*res["size"])
        buckets = [b // size.element_size for b in res["buckets"]] if res["buckets"] else None
        predicted = predict(SCENARIOS[name][0], size, 2, res["steps"], buckets=buckets, rank=rank)
        measured = {k: v for k, v in res["comm"]["by_label"].items() if k != "ddp_setup"}
        assert sum(v[0] for v in measured.values()) > 0
        assert measured == predicted["by_label"]


HIER = {
    "hier_ma": ({"name": "hierarchical", "group_size": 2, "outer": "model_averaging", "sync_period": 2}, 5, None,
                MLP, SGD),
    "hier_bn": ({"name": "hierarchical", "group_size": 2, "outer": "model_averaging", "sync_period": 2}, 4, None,
                CONFORMER_BN, SGD),
    "hier_scale_lr": ({"name": "hierarchical", "group_size": 2, "sync_period": 2, "scale_lr": True}, 1, None, MLP, SGD),
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
            size = ModelSize(*res["size"])
            buckets = [b // size.element_size for b in res["buckets"]]
            predicted = predict(HIER[name][0], size, 4, res["steps"], buckets=buckets, rank=rank)["by_label"]
            for label, (nbytes, calls) in (res["resume_setup"] or {}).get("by_label", {}).items():
                if label != "ddp_setup":  # a resumed run starts twice: its second broadcast is real traffic
                    predicted[label] = [predicted[label][0] + nbytes, predicted[label][1] + calls]
            assert {k: v for k, v in res["comm"]["by_label"].items() if k != "ddp_setup"} == predicted
    assert not close(refs["hier_ma"]["locals"][0], refs["hier_ma"]["locals"][1])


def test_hierarchical_averages_batch_norm_statistics_over_all_ranks(four_ranks):
    """At each outer synchronisation (steps 2 and 4) every rank's batch-norm statistics become their
    mean over all 4 ranks, although DDP inside a group leaves them to differ; every call is counted,
    subgroups included."""
    assert_buffers_averaged(four_ranks, "hier_bn", [2, 4])
    states = [four_ranks[r]["hier_bn"]["local"] for r in range(4)]
    keys = [k for k in states[0] if "running_mean" in k or "running_var" in k]
    assert keys
    for r in (1, 2, 3):
        for k in keys:
            assert torch.allclose(states[0][k], states[r][k], atol=1e-6), (r, k)
    for r in range(4):
        calls = four_ranks[r]["hier_bn"]["calls"]
        assert [b[0] - a[0] for a, b in zip(calls, calls[1:])] == [b[1] - a[1] for a, b in zip(calls, calls[1:])]


def test_cost_model_hand_computed():
    from asr_parallel.strategies.cost import ModelSize, predict

    size = ModelSize(params=1000, buffers=10, optimizer_state=2000)
    # Ring all-reduce over K = 4: 2 * 3/4 * n * 4 bytes = 6 n bytes; a bucket carries 2 values more.
    assert predict({"name": "sync_sgd"}, size, 4, 100)["bytes_sent"] == 100 * 6 * 1002
    # DDP's rebuilt buckets (from step 2): 400 + 600 values.
    assert predict({"name": "sync_sgd"}, size, 4, 3, buckets=[400, 600])["by_label"] == {
        "gradients": [6 * 1002 + 2 * 6 * (402 + 602), 5]}
    # gloo's binomial broadcast over 4 ranks: the root sends 2 copies (to ranks 1 and 2), rank 1 one
    # (to rank 3), ranks 2 and 3 none; every sync: params, buffers, state and 1 count in one all-reduce.
    ma = predict({"name": "model_averaging", "sync_period": 10, "average_optimizer_state": True}, size, 4, 105)
    assert ma["by_label"] == {"broadcast": [1010 * 4 * 2, 1], "params": [10 * 6 * 3011, 10]}
    for rank, copies in ((1, 1), (2, 0), (3, 0)):
        assert predict({"name": "model_averaging"}, size, 4, 105, rank=rank)["by_label"]["broadcast"] == [
            1010 * 4 * copies, 1]
    # fairseq's warm-up: a broadcast at the start and one after W = 30 local steps.
    bmuf = predict({"name": "bmuf", "sync_period": 10, "warmup_steps": 30}, size, 4, 105)
    assert bmuf["by_label"] == {"broadcast": [2 * 1010 * 8, 2], "params": [7 * 6 * 1011, 7]}
    # a synchronous warm-up through DDP, then the batch-norm statistics averaged once (10 values)
    sync_warm = predict({"name": "bmuf", "sync_period": 10, "warmup_steps": 30, "warmup": "sync"}, size, 4, 105)
    assert sync_warm["by_label"] == {"gradients": [30 * 6 * 1002, 30], "state": [60, 1], "params": [7 * 6 * 1011, 7]}
    # 8 ranks in 2 groups of 4: DDP inside (6 n bytes a step), averaging across 2 (4 n bytes).
    hier = predict({"name": "hierarchical", "group_size": 4, "sync_period": 5}, ModelSize(params=1000), 8, 20)
    assert hier["by_label"] == {"intra": [20 * 6 * 1002, 20], "broadcast": [4000, 1], "inter": [4 * 4 * 1001, 4]}
    assert predict({"name": "easgd"}, size, 1, 100)["bytes_sent"] == 0


def test_run_names_carry_strategy_and_parameters():
    from asr_parallel.strategies import run_name

    assert run_name({"name": "bmuf", "sync_period": 20, "nesterov": True}) == "bmuf_nesterovTrue_sync_period20"
    assert run_name({"name": "sync_sgd"}) == "sync_sgd"


def test_strategy_parameter_errors():
    from asr_parallel.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="valid parameters: beta, sync_period"):
        load_config("recipes/chime6_sim.yaml", ["strategy.name=easgd", "strategy.alpha=0.1"])
    with pytest.raises(ConfigError, match="valid strategies: ad_psgd, async_ps, bmuf, dc_asgd, easgd, gpipe, hierarchical, hogwild, model_averaging, one_f_one_b, pipelined_bp, single, sync_sgd"):
        load_config("recipes/chime6_sim.yaml", ["strategy.name=bmfu"])
    with pytest.raises(ConfigError, match="block_momentum must be in"):
        load_config("recipes/chime6_sim.yaml", ["strategy.name=bmuf", "strategy.block_momentum=1.0"])
    with pytest.raises(ConfigError, match="sync_period must be >= 1"):
        load_config("recipes/chime6_sim.yaml", ["strategy.name=model_averaging", "strategy.sync_period=0"])


def test_hierarchical_scale_lr_multiplies_by_all_ranks(four_ranks):
    """scale_lr multiplies the learning rate by K, the ranks (4), not by the groups (2)."""
    for r in range(4):
        assert four_ranks[r]["hier_scale_lr"]["lr"] == pytest.approx(4 * LR)
        assert four_ranks[r]["hier_ma"]["lr"] == pytest.approx(LR)


@pytest.mark.parametrize("strategy", ["ad_psgd", "gpipe", "one_f_one_b", "pipelined_bp", "synthetic_gradients"])
def test_strategies_with_their_own_step_give_ctc_the_host_lengths(strategy, tmp_path, monkeypatch):
    """The model's forward pass returns its output lengths on the meta device (as a GPU's would be
    off the host): every CTC call must get lengths computed on the host from the batch instead
    (the GPU test checks the same under CUDA)."""
    from test_gpu import own_step_ctc_lengths

    seen = own_step_ctc_lengths(strategy, "cpu", tmp_path, monkeypatch, meta_lengths=True)
    assert seen and all(devices == ("cpu", "cpu") for devices in seen), seen
