"""The trainer on the tiny simulated corpus: the loss falls, a resumed run equals an uninterrupted
one, and NaN losses are skipped and counted, then stop the run."""

from pathlib import Path

import json
import time

import pytest
import torch

from asr_parallel.config import load_config
from asr_parallel.strategies.base import DistContext
from chime6_fixture import TINY_SIMULATION

REPO = Path(__file__).resolve().parents[1]
SMALL_MLP = ["model.name=mlp", "model.mlp.num_layers=2", "model.mlp.hidden_dim=64", "model.mlp.dropout=0.1",
             "train.max_duration=20", "train.log_every_steps=1000", "train.warmup_steps=5", "train.lr=0.003",
             "train.checkpoint_every_steps=1000", "train.epochs=30"]


def make_trainer(data: Path, exp: Path, *overrides: str):
    import sentencepiece as spm
    from lhotse import load_manifest

    from asr_parallel.train.trainer import Trainer

    cfg = load_config(REPO / "recipes/chime6_sim.yaml", TINY_SIMULATION + SMALL_MLP + [f"data_dir={data}", *overrides])
    sp = spm.SentencePieceProcessor(model_file=str(data / "lang_bpe_60" / "bpe.model"))
    train = load_manifest(data / "fbank/chime6-ihm_cuts_train.jsonl.gz")
    dev = load_manifest(data / "fbank/chime6-ihm_cuts_dev.jsonl.gz")
    return Trainer(cfg, exp, DistContext(), train, dev, sp)


def test_loss_decreases(prepared, tmp_path):
    trainer = make_trainer(prepared, tmp_path / "exp", "train.max_steps=40")
    summary = trainer.fit()
    losses = summary["losses"]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert (tmp_path / "exp" / "final.pt").is_file()
    assert list((tmp_path / "exp" / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_equals_uninterrupted_run(prepared, tmp_path):
    full = make_trainer(prepared, tmp_path / "full", "train.max_steps=12").fit()
    first = make_trainer(prepared, tmp_path / "resumed", "train.max_steps=5").fit()
    assert first["losses"] == full["losses"][:5]
    # A new process (here: a new trainer) finds the checkpoint and continues from step 5.
    second = make_trainer(prepared, tmp_path / "resumed", "train.max_steps=12")
    summary = second.fit()
    assert summary["losses"] == full["losses"][5:]
    a = torch.load(tmp_path / "full" / "final.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_across_an_epoch_boundary_and_checkpoint_atomicity(prepared, tmp_path):
    """Checkpoints every 3 steps; the newest complete one is used, a half-written one ignored."""
    from asr_parallel.train import checkpoint as ckpt

    exp = tmp_path / "exp"
    t = make_trainer(prepared, exp, "train.max_steps=7", "train.checkpoint_every_steps=3", "train.keep_checkpoints=2")
    t.fit()
    names = sorted(p.name for p in exp.glob("checkpoint-*"))
    assert names[-1] == "checkpoint-00000007" and len(names) == 2
    (exp / "checkpoint-00000009.tmp").mkdir()  # a save killed half-way
    assert ckpt.latest(exp, 1).name == "checkpoint-00000007"


def test_nan_loss_is_skipped_and_counted(prepared, tmp_path, monkeypatch):
    import asr_parallel.train.trainer as trainer_module

    real = trainer_module.ctc_loss
    calls = {"n": 0}

    def sometimes_nan(*args):
        calls["n"] += 1
        loss = real(*args)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(trainer_module, "ctc_loss", sometimes_nan)
    trainer = make_trainer(prepared, tmp_path / "exp", "train.max_steps=6")
    summary = trainer.fit()
    assert summary["bad_batches"] == 1 and summary["steps"] == 6
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_consecutive_nan_losses_stop_the_run(prepared, tmp_path, monkeypatch):
    import asr_parallel.train.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "ctc_loss", lambda *a: torch.tensor(float("nan"), requires_grad=True))
    trainer = make_trainer(prepared, tmp_path / "exp", "train.max_steps=6", "train.max_bad_batches=3")
    with pytest.raises(trainer_module.TrainingError, match="3 batches in a row had a NaN or inf loss"):
        trainer.fit()


def test_utterances_too_long_for_ctc_are_filtered(prepared, capsys):
    import sentencepiece as spm
    from lhotse import load_manifest

    from asr_parallel.train.data import ctc_min_frames, filter_for_ctc

    assert ctc_min_frames([5, 5, 6, 6, 6]) == 5 + 3
    sp = spm.SentencePieceProcessor(model_file=str(prepared / "lang_bpe_60" / "bpe.model"))
    cuts = load_manifest(prepared / "fbank/chime6-ihm_cuts_train.jsonl.gz")
    kept, stats = filter_for_ctc(cuts, sp, lambda n: n // 40, "train")  # an absurd 40x subsampling
    assert stats["dropped_too_long"] > 0 and stats["kept"] == len(kept)
    assert len(kept) + stats["dropped_too_long"] + stats["dropped_empty"] == len(cuts)
    assert "cannot fit the CTC output length" in capsys.readouterr().out


def test_device_side_skip_with_fused_optimizer(prepared, tmp_path):
    """The GPU path (fused optimiser, skip decided on the device through found_inf), run on the CPU:
    a non-finite batch leaves the parameters untouched and is counted when the host drains."""
    import copy

    from asr_parallel.train.trainer import make_optimizer

    trainer = make_trainer(prepared, tmp_path / "exp")
    trainer.ctx.fused = True
    trainer.optimizer = trainer.ctx.optimizer = make_optimizer(trainer.tc, trainer.wrapped.parameters(), fused=True)
    batch = trainer.dataset[next(iter(trainer._epoch_batches(0)))]
    out = trainer.train_step(batch)
    trainer.pending.append(out)
    assert trainer._drain()["bad"] is False and trainer.losses
    before = copy.deepcopy(trainer.model.state_dict())
    bad_batch = copy.copy(batch)
    bad_batch.feats = batch.feats.clone()
    bad_batch.feats[0, 0, 0] = float("nan")
    trainer.pending.append(trainer.train_step(bad_batch))
    assert trainer._drain()["bad"] is True and trainer.bad_total == 1
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_training_set_smaller_than_a_batch_is_an_error(prepared, tmp_path):
    from asr_parallel.train.trainer import TrainingError

    with pytest.raises(TrainingError, match="no training batches"):
        make_trainer(prepared, tmp_path / "exp", "train.max_duration=5000")


def test_delay_probe_applies_the_gradient_of_delay_steps_ago():
    """The delay probe's step context: the chosen parameters get the gradient of ``delay`` steps
    earlier (none during the first ``delay`` steps), the others this step's; delay 0 is the plain step."""
    from types import SimpleNamespace

    from asr_parallel.bin.delay_probe import DelayedStepContext
    from asr_parallel.train.step import StepContext

    tc = SimpleNamespace(grad_clip=1e9, bf16=False, bf16_cpu=False)
    for delay in (0, 2):
        a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([a, b], lr=1.0)
        ctx = DelayedStepContext(StepContext(tc, torch.device("cpu"), opt), [a], delay)
        for step in range(1, 6):  # gradient of step s: s on both parameters
            opt.zero_grad(set_to_none=True)
            a.grad, b.grad = torch.tensor([float(step)]), torch.tensor([float(step)])
            ctx.apply(torch.zeros(1))
        # b took every gradient, a the first 5 - delay of them
        assert float(b.detach()) == -15.0
        assert float(a.detach()) == -sum(range(1, 6 - delay))
        assert len(ctx.queue) == delay


def test_the_wait_for_the_others_at_a_pause_counts_as_training(monkeypatch, tmp_path):
    """At a checkpoint (every epoch's end writes one) the ranks meet at the save's first barrier: a
    rank that waits there for a slower one counts the wait in train_seconds, as a synchronous rank
    counts its waits in all-reduces; the save's later barriers (writing, publishing) do not count."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from asr_parallel.train import trainer as trainer_module

    clock = [100.0]
    monkeypatch.setattr(trainer_module.time, "time", lambda: clock[0])
    waits = iter([5.0, 0.5, 0.25])  # the meeting, then the write and the publication

    def barrier():
        clock[0] += next(waits)

    def save(exp_dir, step, rank, world_size, state, barrier, keep, all_ok):
        barrier()
        clock[0] += 0.5  # the agreement that every write succeeded (an all-reduce, not a barrier)
        barrier()
        return exp_dir / f"checkpoint-{step:08d}"

    monkeypatch.setattr(trainer_module.ckpt, "save", save)
    fake = SimpleNamespace(_drain=lambda: None, step=7, strategy=SimpleNamespace(state_lock=nullcontext),
                           state_dict=lambda: {}, dist=SimpleNamespace(distributed=False, rank=0, world_size=1),
                           exp_dir=tmp_path, tc=SimpleNamespace(keep_checkpoints=3), _barrier=barrier,
                           train_seconds=10.0)
    assert trainer_module.Trainer.save_checkpoint(fake).name == "checkpoint-00000007"
    assert fake.train_seconds == 15.0


def test_a_slow_rank_waits_its_compute_time_again_per_factor(monkeypatch, tmp_path):
    """train.slow_ranks {rank: f}: after each step the rank sleeps (f - 1) times the step's compute
    time, measured on the training thread's CPU clock, so that time spent waiting (for an
    all-reduce, a server) is not scaled."""
    from types import SimpleNamespace

    from asr_parallel.train import trainer as trainer_module

    # the clock: a wait inside the step does not advance it, computation does
    fake = SimpleNamespace(device=torch.device("cpu"))
    clock = trainer_module.Trainer._compute_clock
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        c0 = clock(fake)
        time.sleep(0.3)
        waited = clock(fake) - c0
        c0, t0 = clock(fake), time.time()
        a = torch.randn(256, 256)
        while time.time() - t0 < 0.3:
            a = torch.tanh(a @ a)
        computed = clock(fake) - c0
    finally:
        torch.set_num_threads(threads)
    assert waited < 0.05 and computed > 0.1, (waited, computed)

    slept = []
    monkeypatch.setattr(trainer_module.time, "sleep", slept.append)
    fake = SimpleNamespace(slow=3.0, device=torch.device("cpu"), slow_seconds=0.0, _compute_clock=lambda: 100.5)
    trainer_module.Trainer._straggle(fake, 100.0)  # a step of 0.5 s of computation
    assert slept == [1.0] and fake.slow_seconds == 1.0
    fake.slow = 1.0
    trainer_module.Trainer._straggle(fake, 100.0)
    assert slept == [1.0]  # a rank at normal speed does not wait
    cfg = load_config(REPO / "recipes/chime6_sim.yaml", ["train.world_size=2", "train.slow_ranks={1: 2.0}"])
    assert cfg.train.slow_ranks == {1: 2.0}
    # a dumped config (as stage 8 writes one per run) reads back the same
    from asr_parallel.config import dump_config

    dump_config(cfg, tmp_path / "run.yaml")
    assert load_config(tmp_path / "run.yaml").train.slow_ranks == {1: 2.0}
    for bad, message in (("{-1: 2.0}", "keys must be ranks"), ("{1: 0.5}", "factors >= 1.0")):
        with pytest.raises(Exception, match=message):
            load_config(REPO / "recipes/chime6_sim.yaml", ["train.world_size=2", f"train.slow_ranks={bad}"])


def test_momentum_is_sgds_momentum_and_adams_beta1():
    """``train.momentum`` sets SGD's momentum and Adam/AdamW's beta1 (the knob of the momentum
    sweep); its default 0.9 is Adam's own default beta1, so the default optimiser is unchanged."""
    from asr_parallel.config import TrainConfig
    from asr_parallel.train.trainer import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    for name in ("adam", "adamw"):
        assert make_optimizer(TrainConfig(optimizer=name), params).param_groups[0]["betas"] == (0.9, 0.999)
        assert make_optimizer(TrainConfig(optimizer=name, momentum=0.4), params).param_groups[0]["betas"][0] == 0.4
    assert make_optimizer(TrainConfig(optimizer="sgd", momentum=0.3), params).param_groups[0]["momentum"] == 0.3
    assert torch.optim.AdamW(params).defaults["betas"] == (0.9, 0.999)


def test_compiled_stages_train_as_the_eager_model(prepared, tmp_path):
    """``train.compile``: every stage compiled in place (here with the aot_eager backend, whose
    graphs run eager kernels; inductor is the GPU script's) trains to the eager run's losses and
    parameters, under the same parameter names (checkpoints are interchangeable)."""
    eager = make_trainer(prepared, tmp_path / "eager", "train.max_steps=4").fit()
    torch._dynamo.reset()
    compiled = make_trainer(prepared, tmp_path / "compiled", "train.max_steps=4", "train.compile=true",
                            "train.compile_backend=aot_eager")
    assert all(getattr(s, "_compiled_call_impl", None) is not None for s in compiled.model.stages)
    summary = compiled.fit()
    assert summary["losses"] == pytest.approx(eager["losses"], rel=1e-5)
    a = torch.load(tmp_path / "eager" / "final.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "compiled" / "final.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


# the default recipe's epochs and conformer block before 2026-12-02 (now 10, and the rotary block)
E12 = ["train.epochs=12", "model.conformer.block=torchaudio"]


def test_fingerprints_of_runs_from_before_the_new_keys():
    """Keys added since (``model.conformer.block``, ``train.bf16_cpu``) are left out of the training
    fingerprint at their defaults, and ``train.compile`` is operational, so a run finished before
    keeps its fingerprint: the values below are those the code of 105aa65 computed for these
    recipes (the default recipe then trained 12 epochs: E12). The rotary block changes it. (``train.bf16_cpu: auto`` fingerprints as float32 here
    because the suite keeps ``auto`` float32; on a CPU with bf16, stage 5 settles ``auto`` to an
    existing run's recorded precision first:
    test_auto_settles_on_an_existing_runs_precision_and_the_environment_is_checked.)"""
    from asr_parallel.train.trainer import training_fingerprint

    assert training_fingerprint(load_config(REPO / "recipes/chime6_sim.yaml", E12)) == "307a39ec1980f335"
    assert training_fingerprint(load_config(REPO / "recipes/chime6_sim_stragglers.yaml")) == "62d123f811ab4794"
    assert training_fingerprint(load_config(REPO / "recipes/chime6_sim.yaml", E12 + ["train.compile=true"])) == \
        "307a39ec1980f335"
    rotary = load_config(REPO / "recipes/chime6_sim.yaml", E12 + ["model.conformer.block=rotary"])
    assert training_fingerprint(rotary) != "307a39ec1980f335"
    assert training_fingerprint(load_config(REPO / "recipes/chime6_sim.yaml", E12 + ["train.bf16_cpu=true"])) != \
        "307a39ec1980f335"


def test_bf16_cpu_auto_follows_the_cpu_and_the_fingerprint_follows_what_runs(monkeypatch):
    """``train.bf16_cpu: auto`` (the default) turns bf16 on exactly where the CPU has it natively (never
    emulated), ``ASR_PARALLEL_BF16_CPU=0`` keeps it off, and on GPU ranks it is irrelevant; the
    training fingerprint follows what runs: float32 under ``auto`` is the fingerprint of the float32
    runs from before the key existed, bf16 another."""
    import warnings

    from asr_parallel.config import TrainConfig
    from asr_parallel.train import step as step_mod
    from asr_parallel.train.trainer import training_fingerprint

    cpu, auto = torch.device("cpu"), TrainConfig()
    assert auto.bf16_cpu == "auto"
    assert load_config(REPO / "recipes/chime6_sim.yaml", E12).train.bf16_cpu == "auto"
    monkeypatch.delenv("ASR_PARALLEL_BF16_CPU")
    monkeypatch.setattr(step_mod.torch.cuda, "is_available", lambda: False)
    recipe = load_config(REPO / "recipes/chime6_sim.yaml", E12)
    monkeypatch.setattr(step_mod, "cpu_has_native_bf16", lambda: False)
    assert not step_mod.bf16_enabled(auto, cpu)
    assert training_fingerprint(recipe) == "307a39ec1980f335"  # as before the key
    monkeypatch.setattr(step_mod, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert step_mod.bf16_enabled(auto, cpu)
    assert training_fingerprint(recipe) != "307a39ec1980f335"
    assert training_fingerprint(recipe) == training_fingerprint(
        load_config(REPO / "recipes/chime6_sim.yaml", E12 + ["train.bf16_cpu=true"]))
    assert not step_mod.bf16_enabled(TrainConfig(bf16_cpu=False), cpu)
    assert not step_mod.bf16_enabled(TrainConfig(bf16=False), torch.device("cuda"))  # train.bf16 decides there
    gpu_run = load_config(REPO / "recipes/chime6_sim.yaml", E12 + ["train.device=cuda"])
    assert not step_mod.cpu_bf16_in_effect(gpu_run.train)
    monkeypatch.setenv("ASR_PARALLEL_BF16_CPU", "0")
    assert not step_mod.bf16_enabled(auto, cpu)
    assert step_mod.bf16_enabled(TrainConfig(bf16_cpu=True), cpu)  # an explicit true still holds
    assert training_fingerprint(recipe) == "307a39ec1980f335"


def test_auto_settles_on_an_existing_runs_precision_and_the_environment_is_checked(tmp_path, monkeypatch):
    """Stage 5 resolves ``auto`` before fingerprinting: to the bool an existing run's config.yaml
    recorded (a float32 run from before bf16 became the default is resumed as float32), else to this
    CPU's choice; an explicit setting is left alone; an unreadable config.yaml and a malformed
    ASR_PARALLEL_BF16_CPU are errors that name them."""
    from asr_parallel.bin.train import settle_bf16_cpu
    from asr_parallel.config import ConfigError, dump_config
    from asr_parallel.train import step as step_mod

    monkeypatch.setattr(step_mod, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(step_mod.torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("ASR_PARALLEL_BF16_CPU", "on")
    old = load_config(REPO / "recipes/chime6_sim.yaml", ["train.bf16_cpu=false"])
    (tmp_path / "old").mkdir()
    dump_config(old, tmp_path / "old" / "config.yaml")
    cfg = load_config(REPO / "recipes/chime6_sim.yaml")
    settle_bf16_cpu(cfg, tmp_path / "old")
    assert cfg.train.bf16_cpu is False
    cfg = load_config(REPO / "recipes/chime6_sim.yaml")
    settle_bf16_cpu(cfg, tmp_path / "new")
    assert cfg.train.bf16_cpu is True
    cfg = load_config(REPO / "recipes/chime6_sim.yaml", ["train.bf16_cpu=true"])
    settle_bf16_cpu(cfg, tmp_path / "old")
    assert cfg.train.bf16_cpu is True
    gpu = load_config(REPO / "recipes/chime6_sim.yaml", ["train.device=cuda"])
    settle_bf16_cpu(gpu, tmp_path / "new")
    assert gpu.train.bf16_cpu is False  # GPU ranks: train.bf16 decides, recorded as no CPU bf16
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad/config.yaml"):
        settle_bf16_cpu(load_config(REPO / "recipes/chime6_sim.yaml"), tmp_path / "bad")
    for value, wanted in (("0", False), ("off", False), ("No", False), ("1", True), ("true", True)):
        monkeypatch.setenv("ASR_PARALLEL_BF16_CPU", value)
        assert step_mod.cpu_bf16_wanted(cfg.train.__class__()) is wanted
    monkeypatch.setenv("ASR_PARALLEL_BF16_CPU", "maybe")
    with pytest.raises(ValueError, match="ASR_PARALLEL_BF16_CPU='maybe'"):
        step_mod.cpu_bf16_wanted(cfg.train.__class__())


def test_bf16_on_cpu_only_when_asked_and_said_when_emulated(monkeypatch):
    """``train.bf16`` alone leaves CPU ranks in float32; ``train.bf16_cpu`` turns autocast on (with a
    warning where the CPU has no native bf16), and a training step then runs the matmuls in bf16."""
    import warnings

    from asr_parallel.config import TrainConfig
    from asr_parallel.models import build_model
    from asr_parallel.train import step as step_mod

    cpu = torch.device("cpu")
    assert not step_mod.bf16_enabled(TrainConfig(bf16=True, bf16_cpu=False), cpu)
    monkeypatch.setattr(step_mod, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="emulated"):
        assert step_mod.bf16_enabled(TrainConfig(bf16_cpu=True), cpu)
    monkeypatch.setattr(step_mod, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert step_mod.bf16_enabled(TrainConfig(bf16_cpu=True), cpu)
    cfg = load_config(REPO / "recipes/chime6_sim.yaml", ["model.conformer.model_dim=16", "model.conformer.num_layers=1",
                                                         "model.conformer.num_heads=2", "model.conformer.ffn_dim=32",
                                                         "model.conformer.block=rotary", "train.bf16_cpu=true"])
    net = build_model(cfg.model, 80, 10)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ctx = step_mod.StepContext(cfg.train, cpu, opt)
    assert ctx.use_bf16
    with ctx.autocast():
        logits, lens = net(torch.randn(2, 60, 80), torch.tensor([60, 50]))
    assert logits.dtype == torch.bfloat16
    ctx.loss_sum(logits, lens, [[1, 2, 3], [4, 5]]).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_momentum_and_compile_backend_are_checked():
    from asr_parallel.config import ConfigError

    with pytest.raises(ConfigError, match="train.momentum.*beta1"):
        load_config(REPO / "recipes/chime6_sim.yaml", ["train.momentum=1.0"])
    load_config(REPO / "recipes/chime6_sim.yaml", ["train.momentum=1.2", "train.optimizer=sgd"])
    with pytest.raises(ConfigError, match="train.compile_backend"):
        load_config(REPO / "recipes/chime6_sim.yaml", ["train.compile=true", "train.compile_backend=inductr"])


def test_loader_workers_deliver_the_same_batches_and_auto_resolves_per_device(prepared, monkeypatch):
    """Worker processes change where batches are made, not what they are: the recipe's loader with 2
    workers yields exactly the batches of the training thread's own loader. ``num_workers: auto``
    gives none on a CPU rank and up to 4 on a GPU rank, within its share of the cores less one."""
    import os

    import sentencepiece as spm
    from lhotse import load_manifest

    from asr_parallel.train.data import CutDataset, loader, loader_workers, make_sampler

    sp = spm.SentencePieceProcessor(model_file=str(prepared / "lang_bpe_60" / "bpe.model"))
    cuts = load_manifest(prepared / "fbank/chime6-ihm_cuts_train.jsonl.gz")
    sampler = make_sampler(cuts, 20.0, 2, True, 0, 1, 7)
    sampler.set_epoch(1)
    plan = list(sampler)[:4]
    assert len(plan) == 4
    alone = list(loader(CutDataset(sp), plan, 0))
    workers = list(loader(CutDataset(sp), plan, 2))
    for a, b in zip(alone, workers, strict=True):
        assert torch.equal(a.feats, b.feats) and torch.equal(a.feat_lens, b.feat_lens)
        assert a.tokens == b.tokens and a.cut_ids == b.cut_ids

    assert loader_workers("auto", torch.device("cpu")) == 0
    assert loader_workers(3, torch.device("cpu")) == 3
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert loader_workers("auto", torch.device("cuda")) == 4
    assert loader_workers("auto", torch.device("cuda"), ranks_here=8) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # bound to one core by its launcher
    assert loader_workers("auto", torch.device("cuda"), ranks_here=8) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)))  # bound to 6 of the 16
    assert loader_workers("auto", torch.device("cuda"), ranks_here=8) == 4
    with pytest.raises(Exception, match="num_workers"):
        load_config(REPO / "recipes/chime6_sim.yaml", ["train.num_workers=-1"])
    assert load_config(REPO / "recipes/chime6_sim.yaml", []).train.num_workers == "auto"


@pytest.mark.parametrize("block", ["rotary", "torchaudio"])
def test_padding_batches_to_the_ladder_changes_no_output_and_leaves_few_shapes(prepared, block):
    """``train.pad_growth``: the frames of every batch padded up to a rung of the ladder give an epoch
    a few shapes, and the conformer's outputs on the real frames (and the CTC loss) stay those of the
    unpadded batch: attention masks the padding, and its convolutions saw zeros there already."""
    import sentencepiece as spm
    from lhotse import load_manifest

    from asr_parallel.models import build_model
    from asr_parallel.train.data import CutDataset, make_sampler
    from asr_parallel.train.loss import ctc_loss

    sp = spm.SentencePieceProcessor(model_file=str(prepared / "lang_bpe_60" / "bpe.model"))
    cuts = load_manifest(prepared / "fbank/chime6-ihm_cuts_train.jsonl.gz")
    sampler = make_sampler(cuts, 20.0, 4, True, 0, 1, 7)
    plan = list(sampler)
    plain, padded = CutDataset(sp), CutDataset(sp, 1.25)
    shapes_plain = {plain[c].feats.shape[1] for c in plan}
    shapes_padded = {padded[c].feats.shape[1] for c in plan}
    assert len(shapes_padded) < len(shapes_plain) and all(t % 16 == 0 for t in shapes_padded)
    cfg = load_config(REPO / "recipes/chime6_sim.yaml", TINY_SIMULATION + [
        f"model.conformer.block={block}", "model.conformer.num_layers=2", "model.conformer.model_dim=64",
        "model.conformer.ffn_dim=128", "model.conformer.num_heads=4"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 80, sp.get_piece_size()).eval()
    for cuts in plan[:3]:
        a, b = plain[cuts], padded[cuts]
        assert b.feats.shape[1] > a.feats.shape[1] and torch.equal(a.feat_lens, b.feat_lens)
        with torch.no_grad():
            (ya, la), (yb, lb) = model(a.feats, a.feat_lens), model(b.feats, b.feat_lens)
        assert torch.equal(la, lb)
        for i, n in enumerate(la.tolist()):
            torch.testing.assert_close(yb[i, :n], ya[i, :n], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ctc_loss(yb, lb, b.tokens), ctc_loss(ya, la, a.tokens), atol=1e-3, rtol=1e-5)
    with pytest.raises(Exception, match="pad_growth"):
        load_config(REPO / "recipes/chime6_sim.yaml", ["train.pad_growth=0.9"])
    from asr_parallel.train.trainer import training_fingerprint

    base = load_config(REPO / "recipes/chime6_sim.yaml", [])
    assert training_fingerprint(load_config(REPO / "recipes/chime6_sim.yaml", ["train.pad_growth=1.25"])) != \
        training_fingerprint(base) == training_fingerprint(load_config(REPO / "recipes/chime6_sim.yaml",
                                                                       ["train.pad_growth=1.0"]))


def test_a_lazy_training_manifest_filters_and_trains_as_the_eager_one_keeps(prepared, tmp_path):
    """``train.lazy_manifests``: the training manifest streamed (lhotse's lazy reader), filtered for
    CTC by a lazy filter after one counting pass: it keeps exactly the eager filter's cuts, and a run
    trains from it, every batch drawn from the kept cuts."""
    import sentencepiece as spm
    from lhotse import load_manifest, load_manifest_lazy

    from asr_parallel.train.data import filter_for_ctc
    from asr_parallel.train.trainer import Trainer, training_fingerprint

    sp = spm.SentencePieceProcessor(model_file=str(prepared / "lang_bpe_60" / "bpe.model"))
    path = prepared / "fbank/chime6-ihm_cuts_train.jsonl.gz"
    short = lambda n: n // 12  # noqa: E731 -- a strong subsampling, so that some cuts are dropped
    eager, eager_stats = filter_for_ctc(load_manifest(path), sp, short, "train", report=False)
    lazy, lazy_stats = filter_for_ctc(load_manifest_lazy(path), sp, short, "train", report=False)
    assert lazy.is_lazy and eager_stats == lazy_stats and eager_stats["dropped_too_long"] > 0
    assert [c.id for c in lazy] == [c.id for c in eager]

    cfg = load_config(REPO / "recipes/chime6_sim.yaml", TINY_SIMULATION + SMALL_MLP + [
        f"data_dir={prepared}", "train.lazy_manifests=true", "train.max_steps=3"])
    assert training_fingerprint(cfg) != training_fingerprint(load_config(
        REPO / "recipes/chime6_sim.yaml", TINY_SIMULATION + SMALL_MLP + [f"data_dir={prepared}", "train.max_steps=3"]))
    dev = load_manifest(prepared / "fbank/chime6-ihm_cuts_dev.jsonl.gz")
    trainer = Trainer(cfg, tmp_path / "exp", DistContext(), load_manifest_lazy(path), dev, sp)
    kept = {c.id for c in trainer.train_cuts}
    assert trainer.filter_stats["kept"] == len(kept) and trainer.batches_per_epoch > 0
    assert all(c.id in kept for cuts in trainer._epoch_batches(0) for c in cuts)
    summary = trainer.fit()
    assert len(summary["losses"]) == 3


def test_the_next_epochs_plan_is_drawn_in_the_background_and_is_the_same(prepared, tmp_path, monkeypatch):
    """While an epoch trains, the next epoch's batch plan is drawn on a thread of its own from a
    sampler of its own: it is the plan the seeded sampler gives that epoch (so resumes and runs
    agree), and the epoch trains on it."""
    import threading

    from asr_parallel.train.trainer import Trainer

    drawn = {}
    draw = Trainer._draw_plan

    def recorded(self, epoch):
        plan = draw(self, epoch)
        drawn[epoch] = (threading.current_thread().name, [[c.id for c in b] for b in plan])
        return plan

    monkeypatch.setattr(Trainer, "_draw_plan", recorded)
    trainer = make_trainer(prepared, tmp_path / "exp", "train.max_steps=1000")
    per_epoch = trainer.batches_per_epoch
    trainer.tc.max_steps = per_epoch + 2  # into the second epoch
    trained = []
    step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda b: (trained.append(list(b.cut_ids)), step(b))[1])
    trainer.fit()
    assert drawn[0][0] == "MainThread" and drawn[1][0].startswith("epoch-plan")
    from asr_parallel.train.data import make_sampler

    sampler = make_sampler(trainer.train_cuts, trainer.tc.max_duration, trainer.tc.num_buckets, True,
                           *trainer.shard, trainer.tc.seed)
    sampler.set_epoch(1)
    direct = [[c.id for c in b] for b in sampler]
    assert drawn[1][1] == direct and drawn[1][1] != drawn[0][1]
    assert [sorted(ids) for ids in trained[per_epoch:]] == [sorted(ids) for ids in direct[:2]]
    assert trainer.planner is None


def test_an_epochs_length_is_kept_for_restarts_of_the_same_run(prepared, tmp_path, monkeypatch, capsys):
    """A trainer counts an epoch's batches by drawing epoch 0's plan once per experiment directory; a
    restart with the same cuts and settings reads the count back (no plan drawn), other settings
    draw again, and an unreadable file is counted again with a warning naming it."""
    from asr_parallel.train.trainer import Trainer

    drawn = []
    draw = Trainer._draw_plan
    monkeypatch.setattr(Trainer, "_draw_plan", lambda self, epoch: (drawn.append(epoch), draw(self, epoch))[1])
    first = make_trainer(prepared, tmp_path / "exp", "train.max_steps=1")
    assert drawn == [0]
    kept = tmp_path / "exp" / "epoch_batches" / "rank0.json"
    saved = json.loads(kept.read_text())
    assert saved["batches"] == first.batches_per_epoch > 1
    assert first._epoch_batches(0) and drawn == [0]  # the constructor's plan is the one trained

    drawn.clear()
    again = make_trainer(prepared, tmp_path / "exp", "train.max_steps=5")  # an operational key only
    assert drawn == [] and again.batches_per_epoch == first.batches_per_epoch
    assert len(again._epoch_batches(0)) == first.batches_per_epoch and drawn == [0]  # drawn when trained

    drawn.clear()
    other = make_trainer(prepared, tmp_path / "exp", "train.max_duration=10")
    assert drawn == [0] and other.batches_per_epoch > first.batches_per_epoch
    assert json.loads(kept.read_text())["key"] != saved["key"]

    kept.write_text("{not json")
    drawn.clear()
    make_trainer(prepared, tmp_path / "exp", "train.max_steps=1")
    assert drawn == [0] and str(kept) in capsys.readouterr().err
    assert json.loads(kept.read_text()) == saved


def test_a_mid_epoch_resume_reads_its_batches_from_the_checkpoint(prepared, tmp_path, monkeypatch):
    """A checkpoint inside epoch 1 holds the cut ids of that epoch's batches not yet trained; the
    resumed run trains exactly those (the same losses as an uninterrupted run) without drawing epoch
    1's plan again. A plan naming an utterance the manifests no longer have stops the resume with an
    error naming the checkpoint."""
    from asr_parallel.train import checkpoint as ckpt
    from asr_parallel.train.trainer import Trainer, TrainingError

    probe = make_trainer(prepared, tmp_path / "probe", "train.max_steps=1000")
    per_epoch = probe.batches_per_epoch  # 3 here
    stop, end = per_epoch + 1, 2 * per_epoch + 1  # resumed inside epoch 1, on into epoch 2
    full = make_trainer(prepared, tmp_path / "full", f"train.max_steps={end}").fit()
    make_trainer(prepared, tmp_path / "resumed", f"train.max_steps={stop}").fit()
    state = ckpt.load(ckpt.latest(tmp_path / "resumed", 1), 0, torch.device("cpu"))
    plan = state["progress"]["plan"]
    assert plan["epoch"] == 1 and plan["start"] == 1
    assert len(plan["batches"]) == per_epoch - 1 and all(plan["batches"])

    drawn = []
    draw = Trainer._draw_plan
    monkeypatch.setattr(Trainer, "_draw_plan", lambda self, epoch: (drawn.append(epoch), draw(self, epoch))[1])
    second = make_trainer(prepared, tmp_path / "resumed", f"train.max_steps={end}")
    assert drawn == []  # the epoch's length is the first process's (exp_dir/epoch_batches): no plan drawn
    trained = []
    step = second.train_step
    monkeypatch.setattr(second, "train_step", lambda b: (trained.append(sorted(b.cut_ids)), step(b))[1])
    summary = second.fit()
    assert 1 not in drawn
    assert len(trained) == end - stop
    assert trained[:per_epoch - 1] == [sorted(ids) for ids in plan["batches"]]
    assert summary["losses"] == full["losses"][stop:]

    third = make_trainer(prepared, tmp_path / "resumed", f"train.max_steps={end}")
    path = ckpt.latest(tmp_path / "resumed", 1)
    state = ckpt.load(path, 0, torch.device("cpu"))
    third.load_state_dict(state, path)
    third.saved_plan["batches"][0][0] = "no-such-utterance"
    with pytest.raises(TrainingError, match="no-such-utterance") as err:
        third._epoch_rest()  # the final checkpoint: inside epoch 2
    assert str(path) in str(err.value)
