"""Pipeline strategies on 2 gloo ranks against their definitions: pipelined back-propagation
(delays, weight stashing, global clipping, skipped updates, bytes per boundary, variable-length
batches, checkpoints and resume, a stage that dies), GPipe and 1F1B on torch's pipelining schedules
(equal to non-pipelined training, for the MLP and the conformer), and every call into
torch.distributed counted as gloo's sequence number counts it.

The strategies are driven here through their own interface (``train_step(batch, ctx)``,
``prepare_checkpoint``, ``end_of_epoch``, ``state_dict``, ``eval_model``) with a
:class:`~asr_parallel.train.step.StepContext`, as the trainer drives them; the references are plain
single-process loops.
"""

import math
import os
import time

import pytest
import torch

from strategy_harness import (CONFORMER, CONFORMER_BN, CONFORMER_ROTARY, LR, MLP, SGD, batch, build, config, flat,
                              flat_state, reference_forward_locked, reference_pipelined_bp, reference_synthetic_gradients,
                              reference_synthetic_gradients_stack, spawn_and_reap,
                              torch_optimizer)

STEPS = 6
CLIP = 0.05
S = {"model": MLP, "train": SGD, "steps": STEPS}
MOMENTUM = [o for o in SGD if not o.startswith("train.momentum")] + ["train.momentum=0.9"]
ADAMW = [o for o in SGD if not o.startswith(("train.optimizer", "train.weight_decay", "train.lr"))] + [
    "train.optimizer=adamw", "train.weight_decay=0.01", "train.lr=0.001"]
SCENARIOS = {
    "pbp": {**S, "strategy": {"name": "pipelined_bp"}},
    "pbp_stash": {**S, "strategy": {"name": "pipelined_bp", "weight_stashing": True}},
    # forward-locked: features replay (recompute) and DDG (stash)
    "fr": {**S, "strategy": {"name": "pipelined_bp", "schedule": "forward_locked"}},
    "ddg": {**S, "strategy": {"name": "pipelined_bp", "schedule": "forward_locked", "weight_stashing": True}},
    # SpecTrain's weight prediction, on both schedules
    "spectrain": {**S, "strategy": {"name": "pipelined_bp", "weight_prediction": True}},
    "spectrain_locked": {**S, "strategy": {"name": "pipelined_bp", "weight_prediction": True,
                                           "schedule": "forward_locked"}},
    # ... with the optimisers whose smoothed step it predicts from: SGD with momentum (as in the
    # paper) and AdamW (its update direction, decoupled decay included)
    "spectrain_momentum": {**S, "train": MOMENTUM, "strategy": {"name": "pipelined_bp", "weight_prediction": True}},
    "spectrain_adamw": {**S, "train": ADAMW, "strategy": {"name": "pipelined_bp", "weight_prediction": True}},
    "spectrain_ckpt": {**S, "strategy": {"name": "pipelined_bp", "weight_prediction": True}, "checkpoint": 3},
    "spectrain_resume": {**S, "strategy": {"name": "pipelined_bp", "weight_prediction": True}, "checkpoint": 3,
                         "resume": True},
    # synthetic gradients (DNI), SGD on the synthesiser so that the simulation can follow it
    "sg": {**S, "strategy": {"name": "synthetic_gradients", "synth_optimizer": "sgd", "synth_lr": 0.5,
                             "synth_hidden": 16}},
    "sg_cond": {**S, "strategy": {"name": "synthetic_gradients", "synth_optimizer": "sgd", "synth_lr": 0.5,
                                  "synth_hidden": 16, "conditioned": True}},
    "sg_ckpt": {**S, "strategy": {"name": "synthetic_gradients", "synth_hidden": 16}, "checkpoint": 3},
    "sg_resume": {**S, "strategy": {"name": "synthetic_gradients", "synth_hidden": 16}, "checkpoint": 3,
                  "resume": True},
    "ddg_ckpt": {**S, "strategy": {"name": "pipelined_bp", "schedule": "forward_locked", "weight_stashing": True},
                 "checkpoint": 3},
    "ddg_resume": {**S, "strategy": {"name": "pipelined_bp", "schedule": "forward_locked",
                                     "weight_stashing": True}, "checkpoint": 3, "resume": True},
    "pbp_conformer": {**S, "model": CONFORMER, "strategy": {"name": "pipelined_bp"}},
    "pbp_stash_conformer": {**S, "model": CONFORMER, "strategy": {"name": "pipelined_bp", "weight_stashing": True}},
    "gpipe": {**S, "strategy": {"name": "gpipe", "microbatches": 2, "pad_frames": 1}},
    "1f1b": {**S, "strategy": {"name": "one_f_one_b", "microbatches": 2, "pad_frames": 1}},
    "gpipe_padded": {**S, "strategy": {"name": "gpipe", "microbatches": 2, "pad_frames": 16}},
    # The conformer with its default conv_norm (layer): padding-invariant, so against unpadded batches.
    "gpipe_conformer": {**S, "model": CONFORMER, "strategy": {"name": "gpipe", "microbatches": 2}},
    "1f1b_conformer": {**S, "model": CONFORMER, "strategy": {"name": "one_f_one_b", "microbatches": 2}},
    # The project's conformer block (rotary positions, scaled_dot_product_attention).
    "gpipe_rotary": {**S, "model": CONFORMER_ROTARY, "strategy": {"name": "gpipe", "microbatches": 2}},
    # bf16 autocast on the CPU ranks (train.bf16_cpu: the default recipe's where the CPU has it)
    "gpipe_bf16": {**S, "train": SGD + ["train.bf16_cpu=true"],
                   "strategy": {"name": "gpipe", "microbatches": 2, "pad_frames": 1}},
    # torchaudio's block with two layers, cut after the first (part 0 ends in a block, which runs
    # time-first), and micro-batches of one utterance (batches of 2 and 3 in 3 micro-batches): a part's
    # output of batch size 1 must still have the strides torch's stage recorded (the transposed
    # (T, 1, D) buffer raised PipeliningShapeError before)
    "gpipe_conformer_single": {**S, "model": CONFORMER + ["model.conformer.num_layers=2"],
                               "strategy": {"name": "gpipe", "microbatches": 3, "boundaries": [2]}},
    # frames and micro-batch sizes padded up to a geometric ladder (4, 8, 16, 32, 64 frames: all 64)
    "gpipe_conformer_growth": {**S, "model": CONFORMER,
                               "strategy": {"name": "gpipe", "microbatches": 2, "pad_frames": 4, "pad_growth": 2.0}},
    # The negative control: torchaudio's BatchNorm normalises each micro-batch on its own.
    "gpipe_conformer_bn": {**S, "model": CONFORMER_BN, "strategy": {"name": "gpipe", "microbatches": 2}},
    # A checkpoint after step 3 (2) (drain, state saved and reloaded), without and with a fresh model.
    "pbp_ckpt": {**S, "strategy": {"name": "pipelined_bp"}, "checkpoint": 3},
    "pbp_resume": {**S, "strategy": {"name": "pipelined_bp"}, "checkpoint": 3, "resume": True},
    "gpipe_ckpt": {**S, "strategy": {"name": "gpipe", "microbatches": 2}, "checkpoint": 2},
    "gpipe_resume": {**S, "strategy": {"name": "gpipe", "microbatches": 2}, "checkpoint": 2, "resume": True},
    # NaN features in step 2's batch (the loss of minibatch 1 on the last stage), and a NaN gradient on
    # stage 0 during step 5 (its backward pass of minibatch 2, that of step 3's batch).
    "pbp_nan": {**S, "strategy": {"name": "pipelined_bp"}, "nan_feats": 2, "nan_grad": 5},
    "pbp_clip": {**S, "strategy": {"name": "pipelined_bp"},
                 "train": [o for o in SGD if not o.startswith("train.grad_clip")] + [f"train.grad_clip={CLIP}"]},
}


# ---------------------------------------------------------------- in the spawned ranks (or in-process)


def _sequence_number(dist, strategy) -> int:
    """The calls gloo made so far on the default group and the strategy's subgroups (their sequence
    numbers)."""
    if not dist.initialized:
        return 0
    from asr_parallel.strategies.base import process_group_calls

    return process_group_calls([None] + list(strategy.process_groups()))


def _fresh(cfg, dist, seed: int):
    """Model, strategy, this rank's part and a step context, as the trainer sets them up."""
    from asr_parallel.strategies import build_strategy
    from asr_parallel.train.step import StepContext

    model = build(cfg, seed)
    strategy = build_strategy(cfg.strategy, dist)
    part = strategy.wrap_model(model)
    return model, strategy, part, StepContext(cfg.train, torch.device("cpu"), torch_optimizer(cfg.train, part.parameters()))


def drive(spec: dict, dist, tmp) -> dict:
    """Train ``spec['steps']`` steps (checkpoint, resume and NaN injections as ``spec`` says), drain,
    gather; every call's sequence-number delta is recorded beside the calls the strategy counted."""
    cfg = config(spec["strategy"], spec["model"], spec["train"])
    model, st, part, ctx = _fresh(cfg, dist, 0)
    calls, outs, params_after = [], [], []
    busy_at_checkpoint = None

    def counted(what, fn, *args):
        seq0, calls0 = _sequence_number(dist, st), st.comm.calls
        result = fn(*args)
        calls.append((what, _sequence_number(dist, st) - seq0, st.comm.calls - calls0))
        return result

    nan_grad = {"on": False}
    if spec.get("nan_grad") and dist.rank == 0:
        next(part.parameters()).register_hook(lambda g: torch.full_like(g, float("nan")) if nan_grad["on"] else g)
    for s in range(1, spec["steps"] + 1):
        b = batch(s, st.data_shard()[0])  # every pipeline's own shard (one pipeline: shard 0)
        if spec.get("nan_feats") == s:
            b.feats = torch.full_like(b.feats, float("nan"))
        nan_grad["on"] = spec.get("nan_grad") == s
        outs.append(counted(f"step {s}", st.train_step, b, ctx))
        params_after.append(flat(part))
        if spec.get("checkpoint") == s:
            outs += counted("prepare_checkpoint", st.prepare_checkpoint, ctx)
            path = f"{tmp}/{spec['strategy']['name']}-{dist.rank}.pt"
            busy_at_checkpoint = st.busy
            torch.save({"model": model.state_dict(), "optimizer": ctx.optimizer.state_dict(),
                        "strategy": st.state_dict(), "step": ctx.step}, path)
            if spec.get("resume"):
                state = torch.load(path, weights_only=True)
                model, st, part, ctx = _fresh(cfg, dist, 99)
                model.load_state_dict(state["model"])
                ctx.optimizer.load_state_dict(state["optimizer"])
                st.load_state_dict(state["strategy"])
                ctx.step = state["step"]
    outs += counted("end_of_epoch", st.end_of_epoch, ctx)
    evaluated = counted("eval_model", st.eval_model, part)
    return {"eval": {k: v.clone() for k, v in evaluated.state_dict().items()} if evaluated is not None else None,
            "comm": st.comm.state_dict(), "predicted": st.predicted_comm(), "steps": ctx.step,
            "delays": list(getattr(st, "delays", [])), "starts": list(st.starts), "part": sorted(part.state_dict()),
            "summary": st.summary_figures(), "scalars": st.log_scalars(), "calls": calls, "via_host": st.via_host,
            "params_after": params_after, "busy": st.busy, "busy_at_checkpoint": busy_at_checkpoint,
            "outs": [{"bad": float(o["bad"]), "loss": None if o["loss"] is None else float(o["loss"]),
                      "grad_norm": float(o["grad_norm"]), "cut_ids": list(o["cut_ids"])} for o in outs]}


def _worker(rank, world, store, out, scenarios, tmp):
    import torch.distributed as tdist

    from asr_parallel.strategies.base import DistContext

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    dist = DistContext(rank=rank, world_size=world, initialized=True)
    results = {name: drive(spec, dist, tmp) for name, spec in scenarios.items()}
    torch.save(results, f"{out}-{rank}.pt")
    tdist.destroy_process_group()


CUT3 = [2, 3]  # splice and layer 1 | layer 2 | output
THREE = {
    "fr3": {**S, "strategy": {"name": "pipelined_bp", "schedule": "forward_locked", "boundaries": CUT3}},
    "ddg3": {**S, "strategy": {"name": "pipelined_bp", "schedule": "forward_locked", "weight_stashing": True,
                               "boundaries": CUT3}},
    "sg3": {**S, "strategy": {"name": "synthetic_gradients", "synth_optimizer": "sgd", "synth_lr": 0.5,
                              "synth_hidden": 16, "boundaries": CUT3}},
    "pbp3": {**S, "strategy": {"name": "pipelined_bp", "boundaries": CUT3}},
}


def _run_stages(world: int, scenarios: dict, tmp) -> list[dict]:
    """Every scenario on ``world`` gloo ranks, one part each; every rank's results."""
    import torch.multiprocessing as mp

    out = tmp / "results"
    mp.spawn(_worker, args=(world, str(tmp / "store"), str(out), scenarios, str(tmp)), nprocs=world, join=True)
    return [torch.load(f"{out}-{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def three_stages(tmp_path_factory):
    return _run_stages(3, THREE, tmp_path_factory.mktemp("pipelines3"))


@pytest.mark.parametrize("name, stash", [("fr3", False), ("ddg3", True)])
def test_forward_locked_on_three_stages(three_stages, name, stash):
    """Features replay and DDG on 3 ranks equal the S-stage simulation; the measured staleness is
    S-1-s per stage (2, 1, 0) once full, and every call is counted."""
    cfg = config({"name": "single"})
    got = flat_state(three_stages[0][name]["eval"], cfg)
    expected = reference_forward_locked(cfg, STEPS, [0] + CUT3, stash)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert not torch.allclose(got, reference_forward_locked(cfg, STEPS, [0] + CUT3, not stash), atol=1e-5)
    assert three_stages[0][name]["summary"]["staleness"] == [2.0, 1.0, 0.0]
    for rank in range(3):
        assert dict(three_stages[rank][name]["delays"])[STEPS - 1] == 2 - rank
        assert all(seq == counted for _, seq, counted in three_stages[rank][name]["calls"])


def test_pipelined_bp_delay_per_stage_on_three_stages(three_stages):
    """Chen et al.'s pipelined schedule on 3 ranks: stage s applies gradients 2(S-1-s) updates old
    once full (measured: 4, 2, 0), against S-1-s forward-locked; every call is counted."""
    assert three_stages[0]["pbp3"]["summary"]["staleness"] == [4.0, 2.0, 0.0]
    for rank in range(3):
        delays = dict(three_stages[rank]["pbp3"]["delays"])
        assert delays[STEPS - 1] == 2 * (2 - rank)
        assert [delays[n] for n in range(min(STEPS, 2 * (2 - rank) + 1))] == list(range(min(STEPS, 2 * (2 - rank) + 1)))
        assert all(seq == counted for _, seq, counted in three_stages[rank]["pbp3"]["calls"])


def test_synthetic_gradients_on_three_stages(three_stages):
    """A stack of two synthesisers on 3 ranks: the middle stage back-propagates its own prediction and
    sends the result down as the bootstrapped target of the lowest synthesiser; equals the S-stage
    simulation, and every call is counted."""
    cfg = config({"name": "single"})
    p = THREE["sg3"]["strategy"]
    got = flat_state(three_stages[0]["sg3"]["eval"], cfg)
    expected = reference_synthetic_gradients_stack(cfg, STEPS, [0] + CUT3, p["synth_lr"], p["synth_hidden"])
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    model = build(cfg)
    first = flat(model)
    lower = sum(q.numel() for st in list(model.stages)[:CUT3[1]] for q in st.parameters())
    assert not torch.allclose(got[:lower], first[:lower], atol=1e-7)  # the synthesised stages learnt
    for rank in range(3):
        assert all(seq == counted for _, seq, counted in three_stages[rank]["sg3"]["calls"])


HYBRID = {"hybrid": {**S, "strategy": {"name": "gpipe", "microbatches": 2, "pad_frames": 1, "pipeline_replicas": 2}},
          "hybrid_1f1b": {**S, "strategy": {"name": "one_f_one_b", "microbatches": 2, "pad_frames": 1,
                                            "pipeline_replicas": 2}}}


@pytest.fixture(scope="module")
def four_ranks_hybrid(tmp_path_factory):
    return _run_stages(4, HYBRID, tmp_path_factory.mktemp("hybrid"))


def union_training(steps: int) -> torch.Tensor:
    """One process on the union of the two shards' minibatches of each step (the same frames), the
    CTC loss summed over all their utterances and divided by their number."""
    from asr_parallel.train.loss import ctc_loss

    net = build(config({"name": "single"}))
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    for step in range(1, steps + 1):
        a, b = batch(step, 0), batch(step, 1)
        feats, lens = torch.cat([a.feats, b.feats]), torch.cat([a.feat_lens, b.feat_lens])
        opt.zero_grad()
        logits, out_lens = net(feats, lens)
        (ctc_loss(logits, out_lens, a.tokens + b.tokens) / (len(a.tokens) + len(b.tokens))).backward()
        opt.step()
    return flat(net)


@pytest.mark.parametrize("name", ["hybrid", "hybrid_1f1b"])
def test_hybrid_data_and_pipeline_equals_one_process_on_the_union(four_ranks_hybrid, name):
    """pipeline_replicas 2 on 4 ranks: two GPipe (or 1F1B) pipelines of 2 stages, each on its own
    shard, each stage averaging its gradients with its replica: the update of one process on the
    union of both shards' minibatches; only the first pipeline gathers the model, and every call (the
    replicas' all-reduce included) is counted and predicted."""
    cfg = config({"name": "single"})
    got = flat_state(four_ranks_hybrid[0][name]["eval"], cfg)
    assert torch.allclose(got, union_training(STEPS), atol=1e-5), (got - union_training(STEPS)).abs().max()
    assert not torch.allclose(got, plain_training(STEPS), atol=1e-4)  # not one shard's training
    assert [r[name]["eval"] is None for r in four_ranks_hybrid] == [False, True, True, True]
    for rank, res in enumerate(four_ranks_hybrid):
        res = res[name]
        assert all(seq == counted for _, seq, counted in res["calls"]), (rank, res["calls"])
        assert res["comm"]["by_label"]["replicas"][1] == STEPS
        assert res["comm"]["by_label"] == res["predicted"]["by_label"], rank


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory):
    return _run_stages(2, SCENARIOS, tmp_path_factory.mktemp("pipelines"))


@pytest.fixture(scope="module")
def two_stages_via_host(tmp_path_factory):
    """Pipelined back-propagation, GPipe and 1F1B with every message through host buffers, as on GPU ranks of
    a gloo group (train.dist_backend: gloo), forced on these CPU ranks."""
    os.environ["ASR_PARALLEL_P2P_VIA_HOST"] = "1"  # the spawned ranks inherit it
    try:
        return _run_stages(2, {k: SCENARIOS[k] for k in ("pbp", "gpipe", "1f1b")}, tmp_path_factory.mktemp("via_host"))
    finally:
        del os.environ["ASR_PARALLEL_P2P_VIA_HOST"]


@pytest.mark.parametrize("name", ["pbp", "gpipe", "1f1b"])
def test_messages_through_host_buffers_train_the_same(two_stages, two_stages_via_host, name):
    """Sends of host copies and receives into host buffers copied to the tensors (the path of GPU ranks
    whose process group is gloo) train exactly as direct messages do, with the same calls counted."""
    direct, via_host = two_stages[0][name], two_stages_via_host[0][name]
    assert via_host["via_host"] and not direct["via_host"]
    assert sorted(via_host["eval"]) == sorted(direct["eval"])
    assert all(torch.equal(via_host["eval"][k], direct["eval"][k]) for k in direct["eval"])
    for r in range(2):
        assert two_stages_via_host[r][name]["comm"] == two_stages[r][name]["comm"]
        assert two_stages_via_host[r][name]["calls"] == two_stages[r][name]["calls"]


def plain_training(steps: int, model=MLP, pad_frames: int = 1, grad_clip: float | None = None) -> torch.Tensor:
    """Non-pipelined SGD on the same minibatches (frames zero-padded to a multiple of ``pad_frames``)."""
    from asr_parallel.train.loss import ctc_loss

    net = build(config({"name": "single"}, model))
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    for step in range(1, steps + 1):
        b = batch(step, 0)
        frames = -(-b.feats.shape[1] // pad_frames) * pad_frames
        feats = torch.nn.functional.pad(b.feats, (0, 0, 0, frames - b.feats.shape[1]))
        opt.zero_grad()
        logits, out_lens = net(feats, b.feat_lens)
        (ctc_loss(logits, out_lens, b.tokens) / len(b.tokens)).backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        opt.step()
    return flat(net)


# ---------------------------------------------------------------- pipelined back-propagation


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


@pytest.mark.parametrize("name, stash", [("fr", False), ("ddg", True)])
def test_forward_locked_matches_clocked_simulation(two_stages, name, stash):
    """Forward-locked pipelined back-propagation: features replay (recompute at the current weights;
    Huo, Gu, Huang 2018) and DDG (weights stashed; Huo, Gu, Yang, Huang 2018) equal the one-process
    simulation with stage 1 on minibatch t and stage 0's backward pass on t - 1; neither equals the
    other variant, nor Chen et al.'s pipelined schedule."""
    cfg = config({"name": "single"})
    start = two_stages[0][name]["starts"][1]
    expected = reference_pipelined_bp(cfg, STEPS, start, stash, locked=True)
    got = flat_state(two_stages[0][name]["eval"], cfg)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    for other in (reference_pipelined_bp(cfg, STEPS, start, not stash, locked=True),
                  reference_pipelined_bp(cfg, STEPS, start, stash)):
        assert not torch.allclose(got, other, atol=1e-5)


def test_forward_locked_delay_per_stage_and_resume(two_stages):
    """Stage s applies gradients S-1-s updates old (measured: 1 on stage 0 once full, 0 on stage 1),
    against 2(S-1-s) for the pipelined schedule; a checkpoint drains in S-1 ticks and a resumed run
    ends as the uninterrupted one."""
    for name in ("fr", "ddg"):
        delays0 = dict(two_stages[0][name]["delays"])
        assert [delays0[n] for n in range(1, STEPS)] == [1] * (STEPS - 1) and delays0[0] == 0
        assert set(dict(two_stages[1][name]["delays"]).values()) == {0}
        assert two_stages[0][name]["summary"]["staleness"] == [1.0, 0.0]
    res = two_stages[0]["ddg_ckpt"]
    assert len(res["outs"]) == STEPS + 1 + 1  # one drain tick after step 3's checkpoint, one at the end
    assert [d for _, d in res["delays"]] == [0, 1, 1, 0, 1, 1]  # filled again after the checkpoint
    cfg = config({"name": "single"})
    straight = flat_state(two_stages[0]["ddg_ckpt"]["eval"], cfg)
    assert torch.equal(flat_state(two_stages[0]["ddg_resume"]["eval"], cfg), straight)
    start = two_stages[0]["ddg"]["starts"][1]
    assert not torch.allclose(straight, reference_pipelined_bp(cfg, STEPS, start, True, locked=True), atol=1e-5)


@pytest.mark.parametrize("name, locked", [("spectrain", False), ("spectrain_locked", True)])
def test_weight_prediction_matches_clocked_simulation(two_stages, name, locked):
    """SpecTrain (Chen, Yang, Cheng 2018): stage 0 runs the forward and backward passes of a minibatch
    at its weights plus D times its last update (D = 2 pipelined, 1 forward-locked); equals the
    one-process simulation, differs from the same schedule without prediction, and a run resumed
    from a checkpoint (the last update kept in it) ends as the uninterrupted one."""
    cfg = config({"name": "single"})
    start = two_stages[0][name]["starts"][1]
    expected = reference_pipelined_bp(cfg, STEPS, start, False, locked=locked, predict=True)
    got = flat_state(two_stages[0][name]["eval"], cfg)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    for stash in (False, True):
        assert not torch.allclose(got, reference_pipelined_bp(cfg, STEPS, start, stash, locked=locked), atol=1e-5)
    if not locked:
        assert torch.equal(flat_state(two_stages[0]["spectrain_resume"]["eval"], cfg),
                           flat_state(two_stages[0]["spectrain_ckpt"]["eval"], cfg))


@pytest.mark.parametrize("name, train", [("spectrain_momentum", MOMENTUM), ("spectrain_adamw", ADAMW)])
def test_weight_prediction_follows_the_optimisers_step(two_stages, name, train):
    """SpecTrain predicts from the update the optimiser applied last: with SGD and momentum that is
    -lr times the momentum buffer (Chen, Yang, Cheng 2018), with AdamW its Adam direction plus the
    decoupled decay. Both equal the clocked simulation in which each stage steps torch's own
    optimiser, and differ from it without the prediction."""
    cfg = config({"name": "single"}, train=train)
    start = two_stages[0][name]["starts"][1]
    expected = reference_pipelined_bp(cfg, STEPS, start, False, predict=True, optimizer=True)
    got = flat_state(two_stages[0][name]["eval"], cfg)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    unpredicted = reference_pipelined_bp(cfg, STEPS, start, False, optimizer=True)
    assert not torch.allclose(got, unpredicted, atol=1e-5)
    assert not torch.allclose(got, reference_pipelined_bp(cfg, STEPS, start, False, predict=True), atol=1e-5)


@pytest.mark.parametrize("name, conditioned", [("sg", False), ("sg_cond", True)])
def test_synthetic_gradients_match_clocked_simulation(two_stages, name, conditioned):
    """Decoupled neural interfaces (Jaderberg et al. 2017), plain and conditioned on the targets
    (cDNI): stage 0 updates at once with its synthesiser's prediction, which learns from the true
    gradient two ticks later; equals the one-process simulation, and stage 0 did move (its
    synthesiser, zero at the start, learnt to predict)."""
    cfg = config({"name": "single"})
    start = two_stages[0][name]["starts"][1]
    p = SCENARIOS[name]["strategy"]
    expected = reference_synthetic_gradients(cfg, STEPS, start, p["synth_lr"], p["synth_hidden"], conditioned)
    got = flat_state(two_stages[0][name]["eval"], cfg)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    first = build(cfg)
    lower = torch.cat([q.detach().reshape(-1) for s in list(first.stages)[:start] for q in s.parameters()])
    assert not torch.allclose(got[:lower.numel()], lower, atol=1e-7)
    if conditioned:
        plain = reference_synthetic_gradients(cfg, STEPS, start, p["synth_lr"], p["synth_hidden"], False)
        assert not torch.allclose(got, plain, atol=1e-6)


def test_synthetic_gradients_resume_exactly(two_stages):
    """A checkpoint after step 3 drains S = 2 ticks; a fresh trainer loading it (synthesisers and their
    Adam state included) ends as the uninterrupted run; every call is counted."""
    cfg = config({"name": "single"})
    assert torch.equal(flat_state(two_stages[0]["sg_resume"]["eval"], cfg),
                       flat_state(two_stages[0]["sg_ckpt"]["eval"], cfg))
    assert len(two_stages[0]["sg_ckpt"]["outs"]) == STEPS + 2 + 2
    for rank in (0, 1):
        for name in ("sg_ckpt", "sg_resume"):
            assert all(seq == counted for _, seq, counted in two_stages[rank][name]["calls"])


@pytest.mark.parametrize("name, stash", [("pbp_conformer", False), ("pbp_stash_conformer", True)])
def test_pipelined_bp_matches_clocked_simulation_on_the_conformer(two_stages, name, stash):
    """On torchaudio's conformer block too (attention, depthwise convolution, layer norms), with the
    stashed weights going through ``torch.func.functional_call``: equal to the one-process simulation,
    and not to the other form."""
    cfg = config({"name": "single"}, CONFORMER)
    start = two_stages[0][name]["starts"][1]
    expected = reference_pipelined_bp(cfg, STEPS, start, stash)
    got = flat_state(two_stages[0][name]["eval"], cfg)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert not torch.allclose(got, reference_pipelined_bp(cfg, STEPS, start, not stash), atol=1e-5)


@pytest.mark.parametrize("name", ["pbp", "pbp_stash"])
def test_pipelined_bp_delay_per_stage(two_stages, name):
    # Stage s applies gradients 2 (S-1-s) updates old once the pipeline is full: 2 on stage 0, 0 on
    # stage 1; weight stashing changes which weights the backward pass uses, not the delay.
    delays0 = dict(two_stages[0][name]["delays"])
    delays1 = dict(two_stages[1][name]["delays"])
    assert sorted(delays0) == list(range(STEPS)) and sorted(delays1) == list(range(STEPS))
    assert [delays0[n] for n in range(2, STEPS)] == [2] * (STEPS - 2)
    assert delays0[0] == 0 and delays0[1] == 1  # filling
    assert set(delays1.values()) == {0}
    assert two_stages[0][name]["summary"]["staleness"] == [2.0, 0.0]


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
    assert two_stages[0]["pbp"]["comm"]["by_label"]["forward"] == [forward, 3 * STEPS]
    assert two_stages[1]["pbp"]["comm"]["by_label"]["backward"] == [backward, STEPS]
    assert two_stages[1]["pbp"]["comm"]["by_label"]["forward"] == [0, 3 * STEPS]  # the receives
    assert two_stages[0]["pbp"]["summary"]["bytes_forward"] == [forward]
    assert len({batch(s, 0).feats.shape[1] for s in range(1, STEPS + 1)}) == 3  # variable length went through


def test_one_stage_equals_plain_sgd_with_clipping():
    from asr_parallel.strategies.base import DistContext

    train = [o for o in SGD if not o.startswith("train.grad_clip")] + [f"train.grad_clip={CLIP}"]
    spec = {**S, "train": train, "strategy": {"name": "pipelined_bp"}}
    res = drive(spec, DistContext(), None)
    got = flat_state(res["eval"], config({"name": "single"}))
    assert torch.allclose(got, plain_training(STEPS, grad_clip=CLIP), atol=1e-6)
    assert not torch.allclose(got, plain_training(STEPS), atol=1e-6)  # clipping was active
    assert res["comm"]["calls"] == 0 and res["steps"] == STEPS


def test_one_part_of_synthetic_gradients_is_plain_sgd():
    """With one rank the only part is the last: the true loss, no synthesiser; plain SGD."""
    from asr_parallel.strategies.base import DistContext

    spec = {**S, "strategy": {"name": "synthetic_gradients"}}
    res = drive(spec, DistContext(), None)
    assert torch.allclose(flat_state(res["eval"], config({"name": "single"})), plain_training(STEPS), atol=1e-6)
    assert res["comm"]["calls"] == 0 and res["steps"] == STEPS


def test_pipelined_bp_clips_the_global_norm_of_each_update(two_stages):
    """The update applied at a tick (both stages' slices, of different minibatches) has the norm
    lr * min(norm, grad_clip), norm being the two slices' gradient norm: the global norm is clipped."""
    r0, r1 = two_stages[0]["pbp_clip"], two_stages[1]["pbp_clip"]
    cfg = config({"name": "single"})
    start = r0["starts"][1]
    model = build(cfg)
    before0 = torch.cat([p.detach().reshape(-1) for s in list(model.stages)[:start] for p in s.parameters()])
    before1 = torch.cat([p.detach().reshape(-1) for s in list(model.stages)[start:] for p in s.parameters()])
    clipped = 0
    for t in range(STEPS):
        d0 = (r0["params_after"][t] - before0).norm()
        d1 = (r1["params_after"][t] - before1).norm()
        before0, before1 = r0["params_after"][t], r1["params_after"][t]
        norm = r0["outs"][t]["grad_norm"]
        assert r1["outs"][t]["grad_norm"] == norm
        assert float((d0 ** 2 + d1 ** 2).sqrt()) == pytest.approx(LR * min(norm, CLIP), rel=1e-4)
        clipped += norm > CLIP
        if t >= 2:  # both stages update: per-stage clipping would allow up to sqrt(2) lr grad_clip
            assert float(d0) > 0 and float(d1) > 0
    assert clipped >= 3


def test_non_finite_gradients_are_skipped_counted_and_reported(two_stages):
    r0, r1 = two_stages[0]["pbp_nan"], two_stages[1]["pbp_nan"]
    outs = r0["outs"]
    assert str(outs) == str(r1["outs"])  # every rank reports the same figures (NaN losses included)
    bad = [(i + 1, o["cut_ids"]) for i, o in enumerate(outs) if o["bad"]]
    # Step 3: minibatch 1's loss (NaN features) on the last stage; stage 0 skips it at step 4 without
    # counting it again. Step 5: stage 0's own gradient of minibatch 2 (step 3's batch).
    assert bad == [(3, [f"s2r0u{i}" for i in range(2)]), (5, [f"s3r0u{i}" for i in range(3)])]
    assert all(o["loss"] is not None for o in outs if o["bad"])  # the trainer counts only steps with a loss
    assert r0["summary"]["skipped_updates"] == [2, 1]
    assert r0["scalars"]["pipeline/skipped_updates_stage0"] == 2
    assert r0["scalars"]["pipeline/skipped_updates_stage1"] == 1
    assert all(torch.isfinite(p).all() for p in r0["params_after"] + r1["params_after"])
    assert sorted(n for n, _ in r0["delays"]) == [0, 3, 4, 5]
    assert sorted(n for n, _ in r1["delays"]) == [0, 2, 3, 4, 5]


@pytest.mark.parametrize("name", ["pbp", "gpipe"])
def test_stop_and_resume_equal_an_uninterrupted_run(two_stages, name):
    for rank in (0, 1):
        a, b = two_stages[rank][f"{name}_ckpt"], two_stages[rank][f"{name}_resume"]
        assert b["steps"] == a["steps"] == STEPS
        if rank == 0:
            for key, value in a["eval"].items():
                assert torch.equal(value, b["eval"][key]), key
        assert [o["loss"] for o in a["outs"]] == [o["loss"] for o in b["outs"]]
        assert a["delays"] == b["delays"]
        for key in ("staleness", "skipped_updates", "bytes_forward", "bytes_backward", "grad_clip"):
            assert a["summary"][key] == b["summary"][key], key
        assert len(b["summary"]["idle_fraction"]) == 2
        # The figures went on from the checkpoint: busy seconds over the whole run, not since the resume.
        assert b["busy"] > b["busy_at_checkpoint"] > 0
        assert b["busy_at_checkpoint"] < b["scalars"][f"pipeline/busy_seconds_stage{rank}"] <= b["busy"]
        ca, cb = dict(a["comm"]["by_label"]), dict(b["comm"]["by_label"])
        pa, pb = dict(a["predicted"]["by_label"]), dict(b["predicted"]["by_label"])
        if name == "gpipe":  # the resumed run's new torch stages greet their neighbour once more
            def shapes(steps):  # (micro-batch size, padded frames) met, as the stages are built for them
                return {(-(-batch(s, 0).feats.shape[0] // 2), -(-batch(s, 0).feats.shape[1] // 16) * 16)
                        for s in steps}
            again = len(shapes(range(1, 3)) & shapes(range(3, STEPS + 1)))
            assert again == 1
            hs = [d.pop("handshake") for d in (ca, cb, pa, pb)]
            assert hs[1] == [hs[0][0] + 4 * again, hs[0][1] + 2 * again] and hs[2] == hs[0] and hs[3] == hs[1], hs
        assert ca == cb and pa == pb


def test_pipelined_bp_checkpoint_drains_the_pipeline(two_stages):
    res = two_stages[0]["pbp_ckpt"]
    whats = [w for w, _, _ in res["calls"]]
    assert whats.index("prepare_checkpoint") == 3
    # Draining 2 minibatches after step 3 took 2 ticks with no new input: 6 + 2 + 2 outputs in all.
    assert len(res["outs"]) == STEPS + 2 + 2
    delays0 = [d for _, d in res["delays"]]
    assert delays0 == [0, 1, 2, 0, 1, 2]  # the pipeline filled again after the checkpoint


# ---------------------------------------------------------------- every call counted


@pytest.mark.parametrize("name", ["pbp_ckpt", "pbp_resume", "gpipe_ckpt", "gpipe_resume", "pbp_nan", "1f1b",
                                  "ddg_ckpt", "ddg_resume"])
def test_counted_calls_equal_gloo_sequence_numbers(two_stages, name):
    """Each step, drain, checkpoint and the evaluation gather: the calls the strategy counted are the
    calls gloo made (its sequence number counts every collective, send and receive)."""
    for rank in (0, 1):
        calls = two_stages[rank][name]["calls"]
        assert all(seq == counted for _, seq, counted in calls), calls
        assert sum(seq for _, seq, _ in calls) == two_stages[rank][name]["comm"]["calls"]
        assert any(what == "eval_model" and seq > 0 for what, seq, _ in calls)
    by_label = two_stages[0][name]["comm"]["by_label"]
    assert by_label["control"][1] == len(two_stages[0][name]["outs"])  # one exchange per step or tick
    assert by_label["eval"][1] >= 1


@pytest.mark.parametrize("name", ["pbp", "pbp_stash", "gpipe", "1f1b", "gpipe_padded", "gpipe_conformer",
                                  "pbp_ckpt", "pbp_resume", "gpipe_resume", "sg", "sg_ckpt", "fr", "spectrain"])
def test_counted_bytes_equal_the_strategys_prediction(two_stages, name):
    for rank in (0, 1):
        strategy = two_stages[rank][name]
        assert strategy["comm"]["bytes_sent"] > 0
        assert strategy["comm"]["by_label"] == strategy["predicted"]["by_label"]
        assert strategy["comm"]["calls"] == strategy["predicted"]["calls"]


# ---------------------------------------------------------------- micro-batch pipelines


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "gpipe_padded"])
def test_micro_batch_pipelines_equal_non_pipelined_training(two_stages, name):
    # Batches of 2 and 3 utterances (3 is padded to 4 for 2 micro-batches) and 40, 46, 52 frames.
    cfg = config({"name": "single"})
    got = flat_state(two_stages[0][name]["eval"], cfg)
    expected = plain_training(STEPS, pad_frames=SCENARIOS[name]["strategy"]["pad_frames"])
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("name", ["gpipe_conformer", "1f1b_conformer", "gpipe_conformer_growth", "gpipe_rotary",
                                  "gpipe_conformer_single"])
def test_micro_batch_pipelines_equal_non_pipelined_training_on_the_conformer(two_stages, name):
    """The default conformer (conv_norm: layer) and the rotary block under GPipe and 1F1B, with a dummy
    utterance in every batch of 3 and the frames padded to 16 (the default), equal one process on the
    unpadded batches."""
    model = SCENARIOS[name]["model"]
    cfg = config({"name": "single"}, model)
    got = flat_state(two_stages[0][name]["eval"], cfg)
    expected = plain_training(STEPS, model)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert not torch.allclose(got, flat(build(cfg)), atol=1e-3)  # it trained
    assert all(o["bad"] == 0 and o["loss"] is not None for o in two_stages[0][name]["outs"][:STEPS])


def test_part_outputs_get_the_strides_of_a_fresh_tensor():
    """``dense``: what torch's stage records for an output is a fresh tensor's layout; a batch-of-one
    view of a time-first buffer (contiguous by torch's test) is copied into it, values kept, and a
    tensor already laid out so (an empty one included) is handed on as it is."""
    from asr_parallel.strategies.micro_pipeline import dense

    for shape in ((1, 7, 5), (3, 7, 5), (2, 0, 5), (1,), ()):
        fresh = torch.randn(shape)
        assert dense(fresh) is fresh
    view = torch.randn(7, 1, 5).transpose(0, 1)
    assert view.is_contiguous() and view.stride() == (5, 5, 1)
    out = dense(view)
    assert out.stride() == torch.empty(1, 7, 5).stride() == (35, 5, 1) and torch.equal(out, view)


def test_stashed_recompute_replays_dropout_at_the_stashed_weights():
    """Weight stashing's recomputation (``PipelinedBP._recompute``) on a conformer part with dropout
    (0.1, training mode): with the forward pass's random state and stashed weights, after the part's
    weights have moved on, it gives the forward pass's output exactly and the gradients of a plain
    backward pass at the stashed weights; the current weights are left untouched."""
    import contextlib
    import types

    from asr_parallel.strategies.pipeline import Part
    from asr_parallel.strategies.pipelined_bp import PipelinedBP, _InFlight

    cfg = config({"name": "single"}, [o for o in CONFORMER if "dropout" not in o] + ["model.conformer.dropout=0.1"])
    model = build(cfg)
    part = Part(model, 0, len(model.stages) - 1)
    part.train()
    x, lengths = torch.randn(2, 40, 80), torch.tensor([40, 31])
    rng = torch.get_rng_state()
    y0, _ = part(x, lengths)  # the forward pass, at the weights to be stashed
    stash = [p.detach().clone() for p in part.parameters()]
    g = torch.randn_like(y0)
    y0.backward(g)
    expected = [p.grad.clone() for p in part.parameters()]
    with torch.no_grad():  # the weights move on before the backward pass comes
        for p in part.parameters():
            p.add_(0.1)
    moved = [p.detach().clone() for p in part.parameters()]
    torch.rand(5)  # and the random state too
    item = _InFlight(x, lengths, tuple(y0.shape), y0.dtype, 0, rng, None, stash)
    ctx = types.SimpleNamespace(autocast=contextlib.nullcontext, device=torch.device("cpu"))
    y, stashed = PipelinedBP._recompute(types.SimpleNamespace(part=part), item, x, ctx)
    assert torch.equal(y, y0.detach())
    torch.autograd.backward(y, g)
    for e, w in zip(expected, stashed):
        assert torch.allclose(w.grad, e, atol=1e-6)
    assert all(torch.equal(p.detach(), m) for p, m in zip(part.parameters(), moved))
    item.rng = torch.get_rng_state()  # another draw of the dropout masks gives another output
    assert not torch.allclose(PipelinedBP._recompute(types.SimpleNamespace(part=part), item, x, ctx)[0], y0)


def test_gpipe_trains_under_cpu_bf16_autocast(two_stages):
    """Under bf16 autocast the last part's logits come out in bf16 where torch's stage recorded float32
    (PipeliningShapeError before); they are handed on in float32 and GPipe trains: every step finite,
    the weights near the float32 run's but not equal to them (autocast was on)."""
    outs = two_stages[0]["gpipe_bf16"]["outs"][:STEPS]
    assert all(o["bad"] == 0 and o["loss"] is not None and math.isfinite(o["loss"]) for o in outs), outs
    got, ref = two_stages[0]["gpipe_bf16"]["eval"], two_stages[0]["gpipe"]["eval"]
    assert sorted(got) == sorted(ref)
    diff = max(float((got[k].double() - ref[k].double()).abs().max()) for k in ref if ref[k].is_floating_point())
    assert 0 < diff < 0.05, diff


def test_padding_to_a_ladder_reuses_the_built_stages(two_stages):
    """pad_growth: frames (and micro-batch sizes) go up to rungs of a geometric ladder, so fewer
    shapes occur: the test batches (40, 46, 52 frames; 2 or 3 utterances) make 4 distinct shapes
    padded to 16 frames, and 2 on the ladder 4, 8, 16, 32, 64. A stage is built once per shape and
    the run summary reports the builds, lookups and hit rate of the stage cache."""
    from asr_parallel.train.data import ladder

    assert [ladder(v, 16, 1.25) for v in (1, 17, 65, 81, 1000)] == [16, 32, 80, 112, 1200]
    assert all(ladder(v, 16, 1.0) == -(-v // 16) * 16 for v in range(1, 500))  # growth 1: multiples of 16
    for name, expected in (("gpipe_conformer", 4), ("gpipe_conformer_growth", 2)):
        p = SCENARIOS[name]["strategy"]
        shapes = {(ladder(-(-batch(s, 0).feats.shape[0] // 2), 1, p.get("pad_growth", 1.0)),
                   ladder(batch(s, 0).feats.shape[1], p.get("pad_frames", 16), p.get("pad_growth", 1.0)))
                  for s in range(1, STEPS + 1)}
        assert len(shapes) == expected
        cache = two_stages[0][name]["summary"]["stage_cache"]
        assert cache["lookups"] == STEPS and cache["builds"] == expected, cache
        assert cache["hit_rate"] == round(1 - expected / STEPS, 4)


def test_batch_norm_conformer_is_not_exact_under_gpipe(two_stages):
    """The control for the test above: with BatchNorm in the conv module (statistics per micro-batch)
    GPipe no longer equals one process, by far more than the tolerance used there."""
    cfg = config({"name": "single"}, CONFORMER_BN)
    got = flat_state(two_stages[0]["gpipe_conformer_bn"]["eval"], cfg)
    expected = plain_training(STEPS, CONFORMER_BN)
    assert not torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


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
        assert by_label["forward"] == [expected, 2 * STEPS]  # one send per micro-batch
        assert by_label["backward"] == [0, 2 * STEPS]  # one receive per micro-batch
        assert two_stages[1][name]["comm"]["by_label"]["backward"] == [expected, 2 * STEPS]


# ---------------------------------------------------------------- failures


def _dying_worker(rank, store, out, mode):
    import torch.distributed as tdist

    from asr_parallel.strategies.base import DistContext

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    dead = 1 if mode == "dies" else 0
    if rank == dead:
        if mode == "dies":
            os._exit(3)
        time.sleep(15)  # alive, but sends nothing
        os._exit(0)
    cfg = config({"name": "pipelined_bp", "recv_timeout": 3.0})
    _, strategy, _, ctx = _fresh(cfg, DistContext(rank=rank, world_size=2, initialized=True), 0)
    t0 = time.time()
    try:
        for step in range(1, 4):
            strategy.train_step(batch(step, 0), ctx)
        message = "no error"
    except RuntimeError as e:
        message = str(e)
    with open(out, "w") as f:
        f.write(f"{time.time() - t0:.1f}\n{message}")
    os._exit(0)


@pytest.mark.parametrize("mode", ["dies", "silent"])
def test_dead_or_silent_stage_stops_the_others_with_an_error(tmp_path, mode):
    out = tmp_path / "message.txt"
    spawn_and_reap(_dying_worker, (str(tmp_path / "store"), str(out), mode), 2)
    elapsed, message = out.read_text().split("\n", 1)
    assert "pipeline stage" in message and "has a stage died?" in message, message
    assert float(elapsed) < 30
    if mode == "silent":  # the last stage waited for stage 0 for the timeout, then stopped
        assert "within 3 s" in message and float(elapsed) >= 2.5


def test_only_link_failures_are_reworded_as_a_dead_stage():
    """A timeout or a broken connection names the stage waited for; any other error (here the one a
    CPU tensor meets in an NCCL-only group) reaches the user as it was raised."""
    import datetime

    from asr_parallel.strategies.pipeline import PipelineStrategy

    p = PipelineStrategy.__new__(PipelineStrategy)
    p.part_index, p.timeout = 1, datetime.timedelta(seconds=7)
    gloo = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 7000ms for recv operation")
    with pytest.raises(RuntimeError, match=r"no activation from stage 0 \(rank 0\) within 7 s.*has a stage died"):
        p._fail("activation", 0, gloo)
    with pytest.raises(RuntimeError, match="Connection closed by peer.*") as e:
        p._fail("gradient", 2, RuntimeError("Connection closed by peer [127.0.0.1]:5000"))
    assert "has a stage died" in str(e.value)
    other = RuntimeError("No backend type associated with device type cpu")
    with pytest.raises(RuntimeError) as e:
        p._fail("control", -1, other)
    assert e.value is other


def test_one_stage_micro_batch_pipelines_are_sgd(tmp_path):
    """GPipe and 1F1B on one rank (S = 1: the stage is first and last, the loss computed there) equal
    non-pipelined training on the same batches (frames padded to a multiple of 16 and the batches
    of 3 padded with a dummy utterance, neither of which changes the MLP's loss)."""
    one = {name: {**S, "strategy": {"name": name, "microbatches": 2, "pad_frames": 1}}
           for name in ("gpipe", "one_f_one_b")}
    (rank0,) = _run_stages(1, one, tmp_path)
    expected = plain_training(STEPS)
    cfg = config({"name": "single"})
    for name in one:
        got = flat_state(rank0[name]["eval"], cfg)
        assert torch.allclose(got, expected, atol=1e-5), (name, (got - expected).abs().max())
