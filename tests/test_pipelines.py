"""Pipeline strategies on 2 gloo ranks against their definitions: pipelined back-propagation
(delays, weight stashing, bytes per boundary, variable-length batches, a stage that dies), and
GPipe and 1F1B on torch's pipelining schedules (equal to non-pipelined training)."""

import os
import time

import pytest
import torch

from strategy_harness import MLP, SGD, batch, build, config, flat, flat_state, reference_pipelined_bp, run_ranks

STEPS = 6
SCENARIOS = {
    "pbp": ({"name": "pipelined_bp"}, STEPS, None, MLP, SGD),
    "pbp_stash": ({"name": "pipelined_bp", "weight_stashing": True}, STEPS, None, MLP, SGD),
    "gpipe": ({"name": "gpipe", "microbatches": 2, "pad_frames": 1}, STEPS, None, MLP, SGD),
    "1f1b": ({"name": "one_f_one_b", "microbatches": 2, "pad_frames": 1}, STEPS, None, MLP, SGD),
    "gpipe_padded": ({"name": "gpipe", "microbatches": 2, "pad_frames": 16}, STEPS, None, MLP, SGD),
}


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory):
    return run_ranks(2, SCENARIOS, tmp_path_factory.mktemp("pipelines"))


def test_cut_is_balanced_and_parts_are_disjoint(two_stages):
    res = two_stages[0]["pbp"]
    model = build(config({"name": "single"}))
    assert res["starts"][0] == 0 and 0 < res["starts"][1] < len(model.stages)
    part0, part1 = set(two_stages[0]["pbp"]["part"]), set(two_stages[1]["pbp"]["part"])
    assert part0 and part1 and not part0 & part1


@pytest.mark.parametrize("name, stash", [("pbp", False), ("pbp_stash", True)])
def test_pipelined_bp_matches_clocked_simulation(two_stages, name, stash):
    cfg = config({"name": "single"})
    start = two_stages[0][name]["starts"][1]
    expected = reference_pipelined_bp(cfg, STEPS, start, stash)
    got = flat_state(two_stages[0][name]["eval"], cfg)  # rank 0 gathers the whole model
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    other = reference_pipelined_bp(cfg, STEPS, start, not stash)
    assert not torch.allclose(got, other, atol=1e-5)  # stashing makes a measurable difference


def test_pipelined_bp_delay_per_stage(two_stages):
    # Stage s applies gradients 2 (S-1-s) updates old once the pipeline is full: 2 on stage 0, 0 on stage 1.
    delays0 = dict(two_stages[0]["pbp"]["delays"])
    delays1 = dict(two_stages[1]["pbp"]["delays"])
    assert sorted(delays0) == list(range(STEPS)) and sorted(delays1) == list(range(STEPS))
    assert [delays0[n] for n in range(2, STEPS)] == [2] * (STEPS - 2)
    assert delays0[0] == 0 and delays0[1] == 1  # filling
    assert set(delays1.values()) == {0}


def test_bytes_per_boundary_equal_cost_model(two_stages):
    from asr_parallel.strategies.pipeline import boundary_bytes

    model = build(config({"name": "single"}))
    starts = two_stages[0]["pbp"]["starts"]
    forward = backward = 0
    for step in range(1, STEPS + 1):
        b = batch(step, 0)
        (cost,) = boundary_bytes(model, starts, b.feats.shape[0], b.feats.shape[1])
        forward += cost["forward"]
        backward += cost["backward"]
    assert two_stages[0]["pbp"]["comm"]["by_label"]["forward"][0] == forward
    assert two_stages[1]["pbp"]["comm"]["by_label"]["backward"][0] == backward
    assert len({batch(s, 0).feats.shape[1] for s in range(1, STEPS + 1)}) == 3  # variable length went through


def test_one_stage_equals_plain_sgd():
    from asr_parallel.strategies.base import DistContext
    from asr_parallel.train.trainer import Trainer

    results = []
    for strategy in ({"name": "pipelined_bp"}, {"name": "single"}):
        cfg = config(strategy)
        trainer = Trainer.for_benchmark(cfg, DistContext(), build(cfg))
        for step in range(1, 5):
            trainer.train_step(batch(step, 0))
        trainer.strategy.end_of_epoch(trainer)
        results.append(flat(trainer.model))
    assert torch.equal(results[0], results[1])


def _dying_worker(rank, store, out, mode):
    import torch.distributed as tdist

    from asr_parallel.strategies.base import DistContext
    from asr_parallel.train.trainer import Trainer

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    dead = 1 if mode == "dies" else 0
    if rank == dead:
        if mode == "dies":
            os._exit(3)
        time.sleep(15)  # alive, but sends nothing
        os._exit(0)
    cfg = config({"name": "pipelined_bp", "recv_timeout": 3.0})
    trainer = Trainer.for_benchmark(cfg, DistContext(rank=rank, world_size=2, initialized=True), build(cfg))
    t0 = time.time()
    try:
        for step in range(1, 4):
            trainer.train_step(batch(step, 0))
        message = "no error"
    except RuntimeError as e:
        message = str(e)
    with open(out, "w") as f:
        f.write(f"{time.time() - t0:.1f}\n{message}")
    os._exit(0)


@pytest.mark.parametrize("mode", ["dies", "silent"])
def test_dead_or_silent_stage_stops_the_others_with_an_error(tmp_path, mode):
    import torch.multiprocessing as mp

    out = tmp_path / "message.txt"
    ctx = mp.spawn(_dying_worker, args=(str(tmp_path / "store"), str(out), mode), nprocs=2, join=False)
    for p in ctx.processes:
        p.join(60)
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    elapsed, message = out.read_text().split("\n", 1)
    assert "pipeline stage" in message and "has a stage died?" in message, message
    assert float(elapsed) < 30
    if mode == "silent":  # the last stage waited for stage 0 for the timeout, then stopped
        assert "within 3 s" in message and float(elapsed) >= 2.5


def plain_training(steps: int, pad_frames: int = 1) -> torch.Tensor:
    """Non-pipelined training on the same minibatches (frames zero-padded to a multiple of ``pad_frames``)."""
    from asr_parallel.strategies.base import DistContext
    from asr_parallel.train.trainer import Trainer

    cfg = config({"name": "single"})
    trainer = Trainer.for_benchmark(cfg, DistContext(), build(cfg))
    for step in range(1, steps + 1):
        b = batch(step, 0)
        frames = -(-b.feats.shape[1] // pad_frames) * pad_frames
        b.feats = torch.nn.functional.pad(b.feats, (0, 0, 0, frames - b.feats.shape[1]))
        trainer.train_step(b)
    return flat(trainer.model)


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "gpipe_padded"])
def test_micro_batch_pipelines_equal_non_pipelined_training(two_stages, name):
    # Batches of 2 and 3 utterances (3 is padded to 4 for 2 micro-batches) and 40, 46, 52 frames.
    cfg = config({"name": "single"})
    got = flat_state(two_stages[0][name]["eval"], cfg)
    expected = plain_training(STEPS, SCENARIOS[name][0]["pad_frames"])
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_micro_batch_pipeline_bytes_per_boundary(two_stages):
    from asr_parallel.strategies.pipeline import boundary_shapes

    model = build(config({"name": "single"}))
    starts = two_stages[0]["gpipe"]["starts"]
    expected = 0
    for step in range(1, STEPS + 1):
        b = batch(step, 0)
        micro = -(-b.feats.shape[0] // 2)
        ((bb, t, d),) = boundary_shapes(model, starts, micro, b.feats.shape[1])
        expected += 2 * bb * t * d * 4  # 2 micro-batches
    for name in ("gpipe", "1f1b"):
        by_label = two_stages[0][name]["comm"]["by_label"]
        assert by_label["forward"][0] == expected
        assert two_stages[1][name]["comm"]["by_label"]["backward"][0] == expected
        assert by_label["forward"][1] == 2 * STEPS  # one send per micro-batch


@pytest.mark.parametrize("name", ["pbp", "pbp_stash", "gpipe", "1f1b", "gpipe_padded"])
def test_counted_bytes_equal_the_strategys_prediction(two_stages, name):
    for rank in (0, 1):
        strategy = two_stages[rank][name]
        assert strategy["comm"]["bytes_sent"] > 0
        assert strategy["comm"]["by_label"] == strategy["predicted"]["by_label"]
