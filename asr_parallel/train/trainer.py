"""The training loop: CTC acoustic models over BPE units, with a pluggable parallel strategy.

One process per rank (``torchrun`` for more than one; gloo on CPU, NCCL on GPU). The loop is the
same for every strategy: the strategy wraps the model and acts around the optimiser step, or owns
the step entirely (see :mod:`asr_parallel.strategies.base`); either way the step's mechanics
(precision, loss, clipping, the skip of a bad step, the schedule) are those of one
:class:`~asr_parallel.train.step.StepContext`.

Per step: features (SpecAugment in training) -> model -> log-softmax -> CTC loss summed over the
batch -> divided by the utterances it averages over (this rank's; all ranks' when the strategy
all-reduces gradients every step, whose all-reduce carries the counts) -> backward -> gradient
clipping -> optimiser and schedule step. A step whose loss or gradient norm is NaN or inf is
skipped and counted; ``max_bad_batches`` of them in a row stop the run with an error naming the
batch. The decision is local: ranks that must agree see the same all-reduced gradients, so no step
makes a collective call of its own.

Every collective call the trainer itself makes (epoch lengths, checkpoint barriers, the final
figures) is counted in the strategy's counter under ``trainer``. With ``GLOO_SOCKET_IFNAME`` naming
a real link (the emulated cluster), the bytes that crossed it are read from the interface's
counters and reported beside the modelled ones (:mod:`asr_parallel.utils.netstat`).

Checkpoints (every ``checkpoint_every_steps`` and at the end of every epoch) hold everything needed
to resume exactly; on CPU with a fixed seed the losses after a resume equal an uninterrupted run's.
A checkpoint taken mid-epoch holds the cut ids of the epoch's batches not yet trained, so a resume
reads its batches back rather than drawing the epoch's plan again.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from asr_parallel.config import RecipeConfig, dump_config
from asr_parallel.decode.greedy import greedy_ctc
from asr_parallel.models import build_model
from asr_parallel.score.wer import corpus_errors
from asr_parallel.strategies import build_strategy
from asr_parallel.strategies.base import DistContext, process_group_calls
from asr_parallel.train import checkpoint as ckpt
from asr_parallel.train.data import Batch, CutDataset, filter_for_ctc, loader, loader_workers, make_sampler
from asr_parallel.train.loss import SpecAugment, ctc_loss, host_output_lengths
from asr_parallel.train.step import StepContext, cpu_bf16_in_effect
from asr_parallel.utils import netstat
from asr_parallel.utils.io import atomic_write_json
from asr_parallel.utils.logging import say

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (too many bad batches in a row, ...)."""


def lr_lambda(cfg, total_steps: int):
    def f(step: int) -> float:
        if cfg.scheduler == "constant":
            return 1.0
        warm = cfg.warmup_steps
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        if cfg.scheduler == "warmup_linear":
            return 1.0 - (1.0 - cfg.min_lr_ratio) * progress
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def make_optimizer(cfg, params, fused: bool = False):
    """The configured optimiser; ``fused`` (GPU) selects the single-kernel implementation.
    ``momentum`` is SGD's momentum and Adam/AdamW's beta1 (default 0.9, Adam's own default)."""
    kw = {"fused": True} if fused else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **kw)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay, **kw)


# Where a failed collective's error comes from when it is not a torch.distributed.DistError (gloo's
# errors reach DDP's hooks and futures as plain RuntimeErrors naming its sources or process group).
_COMM_FAILURE = re.compile(r"third_party/gloo|ProcessGroupGloo|ProcessGroupNCCL|c10d")
_NAMED_FAILURE = re.compile(r"died or hung|has a stage died")

# Keys of the train section that do not change what is computed, only when it stops or reports.
OPERATIONAL_KEYS = ("max_steps", "time_limit_minutes", "log_every_steps", "checkpoint_every_steps",
                    "keep_checkpoints", "num_workers", "max_bad_batches", "average_last_checkpoints",
                    "emulate_nodes", "link_rate", "launcher", "nnodes", "node_rank", "rdzv_endpoint",
                    "rdzv_backend", "rdzv_id", "max_restarts", "collective_timeout", "ranks_per_node",
                    "compile", "compile_backend", "dist_backend")


# Training keys added after fingerprints were first recorded, with their defaults: left out of the
# fingerprint at the default, so that a finished run from before keeps its fingerprint.
ADDED_KEYS = {"slow_ranks": {}, "bf16_cpu": False, "pad_growth": 1.0, "lazy_manifests": False, "tf32": False}
ADDED_MODEL_KEYS = {("conformer", "block"): "torchaudio"}  # the same for keys of the model section


def training_fingerprint(cfg: RecipeConfig) -> str:
    """A hash of everything that decides what training computes (model, strategy, tokenizer,
    features, training options other than :data:`OPERATIONAL_KEYS`)."""
    import hashlib

    d = cfg.to_dict()
    operational = set(OPERATIONAL_KEYS)
    if d["strategy"].get("name") in ("pipelined_bp", "synthetic_gradients"):  # checkpoints and max_steps drain the
        operational.discard("checkpoint_every_steps")  # pipeline: other updates
        operational.discard("max_steps")
    d["train"]["bf16_cpu"] = cpu_bf16_in_effect(cfg.train)  # what runs here, not "auto"
    train = {k: v for k, v in d["train"].items()
             if k not in operational and not (k in ADDED_KEYS and v == ADDED_KEYS[k])}
    model = {name: dict(sub) if isinstance(sub, dict) else sub for name, sub in d["model"].items()}
    for (section, k), default in ADDED_MODEL_KEYS.items():
        if model.get(section, {}).get(k) == default:
            del model[section][k]
    key = {"model": model, "strategy": d["strategy"], "tokenizer": d["tokenizer"],
           "features": d["features"], "train": train}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def code_version() -> dict:
    """The git commit of the code that ran, and whether the work tree differed from it."""
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "modified": None}
    return {"commit": head or None, "modified": bool(dirty)}


class Trainer:
    def __init__(self, cfg: RecipeConfig, exp_dir: Path, dist: DistContext, train_cuts, dev_cuts, sp):
        self.cfg, self.tc, self.exp_dir, self.dist, self.sp = cfg, cfg.train, Path(exp_dir), dist, sp
        self.device = dist.device
        self.exp_dir.mkdir(parents=True, exist_ok=True)
        self._start_instruments()
        torch.manual_seed(self.tc.seed)  # identical initial model on every rank
        self.model = build_model(cfg.model, cfg.features.num_mel_bins, sp.get_piece_size()).to(self.device)
        torch.manual_seed(self.tc.seed + 1000 * dist.rank)  # dropout and SpecAugment differ per rank
        out_lens = self.model.output_lengths
        self.train_cuts, self.filter_stats = filter_for_ctc(train_cuts, sp, out_lens, "train",
                                                                dist.is_main)
        self.dev_cuts = filter_for_ctc(dev_cuts, sp, out_lens, "dev", dist.is_main)[0] if dev_cuts is not None else None
        self._setup_training(self.model)
        rank, world = self.strategy.data_shard()
        self.shard = (rank, world)  # this rank's share of the training cuts (its sampler's)
        self.plans: dict = {}  # epoch -> its batch plan being drawn in the background (a Future)
        self.planner = None
        self.dataset = CutDataset(sp, self.tc.pad_growth)
        self.num_workers = loader_workers(self.tc.num_workers, self.device,
                                          int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size)))
        self.batches_per_epoch = self._count_epoch()
        if self.batches_per_epoch == 0:
            hours = sum(c.duration for c in self.train_cuts) / 3600
            raise TrainingError(f"no training batches: {self.filter_stats['kept']} utterances ({hours:.2f} h) in "
                                f"{self.tc.num_buckets} duration buckets fill no batch of train.max_duration="
                                f"{self.tc.max_duration} s per rank (incomplete batches are dropped); lower "
                                "train.max_duration or train.num_buckets")
        # The schedule spans all epochs; max_steps only stops early (so a run stopped by max_steps and
        # resumed with a larger one follows the same schedule as an uninterrupted run).
        self.total_steps = self.strategy.schedule_steps(self.batches_per_epoch, self.tc.epochs,
                                                        self.tc.checkpoint_every_steps)
        if self.strategy.owns_loop and self.tc.max_steps:
            self.strategy.stop_at = min(self.strategy.stop_at, self.tc.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.tc, self.total_steps))
        self.ctx.scheduler = self.scheduler
        self._init_counters()

    def _start_instruments(self) -> None:
        """Read the process groups' call counts and the link's byte counters before any call."""
        self.pg_calls_start = process_group_calls()
        self.wire_if = netstat.training_interface()
        self.wire_start = netstat.interface_bytes(self.wire_if) if self.wire_if else None
        self.wire_before = (0, 0)  # bytes on the link in earlier runs of this experiment (resume)
        self.calls_offset = 0  # calls in the counter that this process did not make (resume)

    def _setup_training(self, model) -> None:
        """Strategy, wrapped model, optimiser and step options (shared with the benchmark)."""
        self.strategy = build_strategy(self.cfg.strategy, self.dist)
        if self.tc.compile:
            # per stage, so that every strategy (pipelines cut the model at stage boundaries) runs the
            # compiled stages; nn.Module.compile keeps the parameter and state-dict names
            for stage in getattr(model, "stages", [model]):
                stage.compile(backend=self.tc.compile_backend)
        self.wrapped = self.strategy.wrap_model(model)
        fused = self.device.type == "cuda"  # fused optimisers skip a step on device (found_inf)
        self.optimizer = make_optimizer(self.tc, self.wrapped.parameters(), fused=fused)
        self.strategy.setup_optimizer(self.optimizer)  # before the schedule records the base rates
        spec_augment = SpecAugment().to(self.device) if self.tc.spec_augment else None
        self.ctx = StepContext(self.tc, self.device, self.optimizer, spec_augment, fused)

    @classmethod
    def for_benchmark(cls, cfg: RecipeConfig, dist: DistContext, model) -> "Trainer":
        """A trainer without data, for timing :meth:`train_step` on given batches."""
        self = cls.__new__(cls)
        self.cfg, self.tc, self.dist, self.device = cfg, cfg.train, dist, dist.device
        self.model = model
        self._start_instruments()
        self._setup_training(model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.tc, 10**9))
        self.ctx.scheduler = self.scheduler
        self._init_counters()
        return self

    @property
    def step(self) -> int:
        """Optimiser steps taken (the step context's counter)."""
        return self.ctx.step

    @step.setter
    def step(self, value: int) -> None:
        self.ctx.step = value

    def _init_counters(self) -> None:
        beyond = [r for r in self.tc.slow_ranks if r >= self.dist.world_size]
        if beyond:
            raise TrainingError(f"train.slow_ranks names rank {beyond[0]}, but the run has {self.dist.world_size} "
                                f"rank(s) (0..{self.dist.world_size - 1})")
        self.slow = float(self.tc.slow_ranks.get(self.dist.rank, 1.0))  # straggler emulation (train.slow_ranks)
        self.slow_seconds = 0.0
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.current_plan = None  # (epoch, its batch the list starts at, the batches from there)
        self.saved_plan = None  # the rest of an epoch's plan read from the checkpoint resumed from
        self.bad_in_row = 0
        self.bad_total = 0
        self.frames_total = 0
        self.elapsed_before = 0.0  # wall-clock of earlier runs of this experiment (resume)
        # seconds inside the training loop (data, steps, communication), without the end-of-epoch
        # evaluation and checkpoint writes: the measured step time the scaling predictor is checked against
        self.train_seconds = 0.0
        self.writer = None
        self.history: list[dict] = []
        self.losses: list[float] = []  # training loss of every good step of this process's run
        self.pending: list[dict] = []  # steps whose device figures the host has not read yet
        self.comm_logged = (0, 0)  # (step, bytes sent) at the last TensorBoard log

    # ------------------------------------------------------------------ data

    def _draw_plan(self, epoch: int) -> list:
        """This rank's batches of ``epoch`` from a new sampler (nothing shared with a background
        thread drawing another epoch): seeded, the same whoever draws it."""
        rank, world = self.shard
        sampler = make_sampler(self.train_cuts, self.tc.max_duration, self.tc.num_buckets, True, rank, world,
                               self.tc.seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    def _plan(self, epoch: int) -> list:
        """Epoch ``epoch``'s batch plan: drawn on a background thread while the epoch before it
        trained (:meth:`_prefetch_plan`), else now. Drawing it is a pass over the cuts' metadata in
        Python (26-28 s per rank for 100 000 cuts on a slow machine, RESULTS.md); how much of it the
        thread hides (it competes for the interpreter's lock) is not measured."""
        for stale in [e for e in self.plans if e < epoch]:  # a resume that starts later
            self.plans.pop(stale).cancel()
        future = self.plans.pop(epoch, None)
        return future.result() if future is not None else self._draw_plan(epoch)

    def _prefetch_plan(self, epoch: int) -> None:
        if epoch >= self.tc.epochs or epoch in self.plans:
            return
        if self.planner is None:
            from concurrent.futures import ThreadPoolExecutor

            self.planner = ThreadPoolExecutor(1, thread_name_prefix="epoch-plan")
        self.plans[epoch] = self.planner.submit(self._draw_plan, epoch)

    def _epoch_rest(self, common: bool = True) -> tuple[list, int]:
        """The batches of this epoch still to train, and the epoch's number of batches. A run resumed
        mid-epoch reads them from the checkpoint (the cut ids of the batches not yet trained,
        :meth:`_plan_state`) instead of drawing the epoch's plan again: exact, and without the
        sampler's pass over every cut; otherwise the epoch's plan, cut to the ranks' common count
        (``common``, :meth:`_epoch_batches`) or this rank's own (a worker of ``owns_loop``). Cut ids
        rather than lhotse's ``DynamicBucketingSampler.state_dict``: restoring that fast-forwards
        the sampler through the batches already trained, which is the pass this avoids."""
        saved, self.saved_plan = self.saved_plan, None
        if saved is not None and saved["epoch"] == self.epoch and saved["start"] == self.batch_in_epoch:
            for drawn in [e for e in self.plans if e <= self.epoch]:  # the constructor's count of epoch 0
                self.plans.pop(drawn).cancel()
            rest = self._cuts_of(saved["batches"], agree=common)
            total = self.batch_in_epoch + len(rest)
        else:
            batches = self._epoch_batches(self.epoch) if common else self._draw_plan(self.epoch)
            rest, total = batches[self.batch_in_epoch:], len(batches)
        self.current_plan = (self.epoch, self.batch_in_epoch, rest)
        return rest, total

    def _plan_state(self) -> dict | None:
        """For the checkpoint: the cut ids of this epoch's batches not trained yet (none at an
        epoch's end, where the next epoch's plan is drawn from the seed)."""
        if self.current_plan is None or self.batch_in_epoch == 0 or self.current_plan[0] != self.epoch:
            return None
        epoch, start, rest = self.current_plan
        return {"epoch": epoch, "start": self.batch_in_epoch,
                "batches": [[c.id for c in b] for b in rest[self.batch_in_epoch - start:]]}

    def _cuts_of(self, batches: list[list[str]], agree: bool) -> list:
        """Batches of cut ids (a checkpoint's plan) as batches of this run's training cuts: a pass
        over the cuts (lazy manifests stream) until all those named are found. With ``agree`` every
        rank learns whether any rank missed one, so that all stop with the error together."""
        from lhotse import CutSet

        need = {i for b in batches for i in b}
        found = {}
        for c in self.train_cuts if need else ():
            if c.id in need:
                found[c.id] = c
                if len(found) == len(need):
                    break
        missing = sorted(need - found.keys())
        everywhere = self._agree_min(0 if missing else 1) if agree else int(not missing)
        if missing:
            raise TrainingError(f"{self.saved_plan_source}: its batch plan names {len(missing)} training utterance(s) "
                                f"that this run's training cuts (after the CTC filter) do not have, e.g. "
                                f"{missing[0]}; the manifests changed since it was written: train into a new "
                                "experiment directory")
        if not everywhere:
            raise TrainingError(f"{self.saved_plan_source}: another rank's batch plan names training utterances "
                                "that this run's training cuts do not have (that rank's error names one); the "
                                "manifests changed since it was written: train into a new experiment directory")
        return [CutSet.from_cuts([found[i] for i in b]) for b in batches]

    def _count_epoch(self) -> int:
        """An epoch's number of batches per rank: every rank's count of epoch 0, the smallest (later
        epochs' plans are cut to their own smallest, :meth:`_epoch_batches`). Counting draws epoch
        0's plan, a pass over every cut (26-28 s per rank at 100 000 cuts on a slow machine,
        RESULTS.md), so the count is kept in ``exp_dir/epoch_batches/rank<r>.json`` under a key of
        everything that decides it (the training fingerprint, the kept cuts' ids and durations,
        this rank's data shard, the world size, lhotse's version): a restart or a resume of the same
        run reads it instead of drawing the plan again. A rank without it (a new run, a node without
        shared storage, other cuts or settings) draws. Either way the ranks make the one all-reduce
        (the minimum) of before: a kept count is that minimum, and a drawn one is at least it."""
        import hashlib

        import lhotse

        from asr_parallel.utils.io import atomic_write_json

        key = hashlib.sha256(json.dumps([self.fingerprint(), self.filter_stats["digest"], list(self.shard),
                                         self.dist.world_size, lhotse.__version__]).encode()).hexdigest()[:16]
        path = self.exp_dir / "epoch_batches" / f"rank{self.dist.rank}.json"
        kept = None
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key and type(saved.get("batches")) is int and saved["batches"] > 0:
                kept = saved["batches"]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as e:  # a cache: warn, count again, rewrite it
            say(f"WARNING: {path} cannot be read ({type(e).__name__}: {e}); counting epoch 0's batches again")
        n = self._epoch_batches(0, count_only=True, kept=kept)
        if n > 0 and n != kept:
            atomic_write_json(path, {"key": key, "batches": n})
        return n

    def _epoch_batches(self, epoch: int, count_only: bool = False, kept: int | None = None):
        """This epoch's batches, the same count on every rank (the minimum), deterministic from the
        seed; with ``count_only`` their number alone, which ``kept`` (a count kept from an earlier
        process, :meth:`_count_epoch`) gives without drawing the plan."""
        if kept is not None and count_only:
            n = kept
        else:
            batches = self._plan(epoch)
            if count_only and not self.strategy.owns_loop:  # keep it for the epoch's training
                from concurrent.futures import Future

                self.plans[epoch] = Future()
                self.plans[epoch].set_result(batches)
            n = len(batches)
        if self.dist.distributed:
            import torch.distributed as tdist

            t = torch.tensor([n], device=self.device if self.device.type == "cuda" else "cpu")
            self._count_control(t)
            tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
            n = int(t.item())
        return n if count_only else batches[:n]

    # ------------------------------------------------------------------ checkpoints

    def _count_control(self, tensor: torch.Tensor | None = None) -> None:
        """Count one of the trainer's own collective calls (an all-reduce of ``tensor``, or a barrier)."""
        from asr_parallel.strategies.base import group_size, ring_allreduce_bytes

        k = group_size()
        if k > 1:
            n = ring_allreduce_bytes(tensor.numel(), tensor.element_size(), k) if tensor is not None else 0
            self.strategy.comm.control(1, n, "trainer")

    def _barrier(self):
        if self.dist.distributed:
            import torch.distributed as tdist

            self._count_control()
            tdist.barrier()

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "strategy": self.strategy.state_dict(),
            "progress": {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                         "plan": self._plan_state(),
                         "bad_in_row": self.bad_in_row, "bad_total": self.bad_total,
                         "frames_total": self.frames_total, "elapsed": self.elapsed_before + self._elapsed(),
                         "train_seconds": self.train_seconds, "wire": list(self._wire_now())},
            "rng": ckpt.rng_state(),
            "history": json.dumps(self.history),
            "world_size": self.dist.world_size,
            "fingerprint": self.fingerprint(),
        }

    def fingerprint(self) -> str:
        return training_fingerprint(self.cfg)

    def save_checkpoint(self, step: int | None = None) -> Path:
        """Every rank writes its part of checkpoint ``step`` (default: this rank's step; strategies
        whose ranks count steps differently pass a number they share)."""
        self._drain()
        step = self.step if step is None else step
        lock = self.strategy.state_lock()
        with lock:
            state = self.state_dict() if isinstance(lock, nullcontext) else copy.deepcopy(self.state_dict())
        from asr_parallel.strategies.base import CommCounter, group_size, ring_allreduce_bytes

        if self.dist.distributed and group_size() > 1:  # the save's own 3 calls, counted as they happen
            counter = CommCounter()
            counter.load_state_dict(state["strategy"]["comm"])
            counter.control(2, 0, "trainer")  # 2 barriers
            counter.control(1, ring_allreduce_bytes(1, 8, group_size()), "trainer")  # every write succeeded?
            state["strategy"]["comm"] = counter.state_dict()
        waits: list[float] = []

        self.phase = f"the barrier of the checkpoint at step {step}"

        def barrier():
            t0 = time.time()
            self._barrier()
            waits.append(time.time() - t0)

        def all_ok(ok: bool) -> bool:
            before = self.phase
            self.phase = f"the agreement that every rank wrote its part of the checkpoint at step {step}"
            everyone = self._agree_min(1 if ok else 0) == 1
            self.phase = before
            return everyone

        path = ckpt.save(self.exp_dir, step, self.dist.rank, self.dist.world_size, state, barrier,
                         self.tc.keep_checkpoints, all_ok=all_ok)
        # The first barrier is where the ranks meet at the pause: a rank that got there first waited for
        # a slower one (a straggler, a strategy whose ranks do not wait for each other between pauses),
        # and that wait belongs to the training loop, as a synchronous rank's waits in its all-reduces do.
        self.train_seconds += waits[0] if waits else 0.0
        return path

    def _agree_min(self, value: int) -> int:
        """The smallest of every rank's ``value`` (one counted all-reduce; the value itself alone)."""
        if not self.dist.distributed:
            return value
        import torch.distributed as tdist

        t = torch.tensor([value], dtype=torch.int64)
        self._count_control(t)
        tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
        return int(t.item())

    def maybe_resume(self) -> bool:
        """Resume from the newest checkpoint step that every rank has and can read. The ranks agree
        on it (a node without shared storage sees only its own files): each proposes its newest, the
        smallest proposal is tried, and if any rank lacks it or cannot read its file (truncated,
        corrupt) every rank drops that step and everything newer, with a warning naming the file.
        A rank that could not read its own file renames that checkpoint to
        ``*.unusable-<time>``, so that it neither counts toward ``keep_checkpoints`` nor is tried
        again; a checkpoint that is merely missing on another rank's storage (no shared storage, or
        a file system that has not shown it yet) stays where it is."""
        steps = [int(p.name.split("-")[1]) for p in ckpt.complete_checkpoints(self.exp_dir, self.dist.world_size)]
        while True:
            step = self._agree_min(max(steps, default=-1))
            if step < 0:
                return False
            path = self.exp_dir / f"checkpoint-{step:08d}"
            state, problem, unreadable = None, "", False
            if step in steps:
                try:
                    state = ckpt.load(path, self.dist.rank, self.device)
                except Exception as e:  # noqa: BLE001 - any unreadable file: fall back, naming it
                    problem = f"{path / f'rank{self.dist.rank}.pt'} cannot be read ({type(e).__name__}: {e})"
                    unreadable = True
            else:
                problem = f"{path} is not on rank {self.dist.rank}'s storage"
            if self._agree_min(0 if problem else 1) == 1:
                break
            if unreadable:
                try:
                    os.replace(path, path.with_name(f"{path.name}.unusable-{time.time_ns()}"))
                except FileNotFoundError:  # another rank of this storage set it aside first
                    pass
            older = [s for s in steps if s < step]
            say(f"WARNING: rank {self.dist.rank}: checkpoint {path} is unusable"
                + (f": {problem}" if problem else " on another rank")
                + (f"; falling back to the one before (step {max(older)})" if older else "; starting afresh"))
            steps = older
        self.load_state_dict(state, path)
        if self.dist.is_main:
            print(f"resuming from {path}: epoch {self.epoch}, batch {self.batch_in_epoch}, step {self.step}")
        return True

    def load_state_dict(self, state: dict, path="checkpoint") -> None:
        """Restore everything :meth:`state_dict` saved (``path`` names the source in errors)."""
        if state["world_size"] != self.dist.world_size:
            raise TrainingError(f"{path} was written by {state['world_size']} ranks, this run has "
                                f"{self.dist.world_size}; start a new experiment directory")
        if state.get("fingerprint") != self.fingerprint():
            raise TrainingError(f"{path} was written with a different model, strategy or training config; "
                                f"delete {getattr(self, 'exp_dir', 'it')} or train into another experiment "
                                "directory")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        own = self.strategy.comm.state_dict()  # this process's calls so far (set-up, epoch length)
        self.strategy.load_state_dict(state["strategy"])
        self.calls_offset = self.strategy.comm.calls
        self.strategy.comm.merge(own)  # the run's totals: earlier processes' and this one's
        p = state["progress"]
        self.step, self.epoch, self.batch_in_epoch = p["step"], p["epoch"], p["batch_in_epoch"]
        self.saved_plan, self.saved_plan_source = p.get("plan"), path
        self.bad_in_row, self.bad_total, self.frames_total = p["bad_in_row"], p["bad_total"], p["frames_total"]
        self.elapsed_before = p["elapsed"]
        self.train_seconds = p.get("train_seconds", 0.0)
        self.wire_before = tuple(p.get("wire", (0, 0)))  # this process's bytes are counted from its start
        self.history = json.loads(state["history"])
        ckpt.set_rng_state(state["rng"])

    # ------------------------------------------------------------------ steps

    def _elapsed(self) -> float:
        return time.time() - self.t_start if hasattr(self, "t_start") else 0.0

    def _wire_now(self) -> tuple[int, int]:
        """(sent, received) bytes on the training link in this experiment so far (0s without one)."""
        if self.wire_start is None:
            return tuple(self.wire_before)
        tx, rx = netstat.interface_bytes(self.wire_if)
        return self.wire_before[0] + tx - self.wire_start[0], self.wire_before[1] + rx - self.wire_start[1]

    def train_step(self, batch: Batch) -> dict:
        """One optimiser step on ``batch`` (a strategy that owns the step does it all itself).

        Returns device tensors (``loss``, ``grad_norm``, ``bad``) and host figures. A batch whose loss or
        gradient norm is not finite updates nothing, but counts as a step. When the strategy averages
        gradients over ranks this step, the summed loss goes backward and the all-reduce divides by all
        ranks' utterances (and poisons the gradients of every rank if any rank's loss is not finite),
        so every rank takes the same decision without a collective. On GPU the decision stays on the
        device: the fused optimiser skips the update when ``found_inf`` is set, so no step waits for
        the GPU; the host reads the flags at logging time (:meth:`_drain`).
        """
        ctx, st = self.ctx, self.strategy
        if st.owns_step:
            return st.train_step(batch, ctx)
        batch = batch.to(self.device)
        step = ctx.step + 1
        self.wrapped.train()
        feats = ctx.augment(batch.feats)
        n = len(batch.tokens)
        self.optimizer.zero_grad(set_to_none=True)
        with st.forward_context(step):
            with ctx.autocast():
                logits, out_lens = self.wrapped(feats, batch.feat_lens)
            out_lens = host_output_lengths(self.model, out_lens, batch.lens_on_host)  # no copy back
            loss_sum = ctc_loss(logits, out_lens, batch.tokens)
            synchronous = st.averages_gradients(step)
            if synchronous:
                st.set_batch_weight(n, loss_sum)
                loss_sum.backward()
            else:
                (loss_sum / n).backward()
        st.after_backward(step, self.wrapped)
        grad_norm = ctx.clip_local(self.wrapped.parameters())
        loss = loss_sum.detach() / n
        # With averaged gradients the norm is the same on every rank (and NaN on all if any loss was not).
        bad = ctx.bad_flag(grad_norm) if synchronous else ctx.bad_flag(loss, grad_norm)
        ctx.apply(bad)
        ctx.advance()
        st.after_optimizer_step(ctx.step, self.wrapped, self.optimizer, bad)
        return {"bad": bad, "loss": loss, "grad_norm": grad_norm.detach(), "frames": batch.num_frames,
                "cut_ids": batch.cut_ids}

    def _drain(self) -> dict | None:
        """Read the pending steps' device figures on the host (one synchronisation), update the counters
        and check for runs of bad batches; returns the last step's figures."""
        last = None
        for out in self.pending:
            if out["loss"] is None:  # a pipeline step that finished no minibatch (filling)
                continue
            loss, bad = float(out["loss"]), bool(out["bad"].item())
            last = {"loss": loss, "grad_norm": float(out["grad_norm"]), "bad": bad}
            if bad:
                self.bad_in_row += 1
                self.bad_total += 1
                log.warning("skipped batch with non-finite loss or gradient (%d in a row, %d in all): %s",
                            self.bad_in_row, self.bad_total, ", ".join(out["cut_ids"][:4]))
                if self.bad_in_row >= self.tc.max_bad_batches:
                    raise TrainingError(
                        f"{self.bad_in_row} batches in a row had a NaN or inf loss or gradient (epoch "
                        f"{self.epoch + 1}, step {self.step}; last batch: {', '.join(out['cut_ids'][:4])}); "
                        "lower train.lr or check the data")
            else:
                self.bad_in_row = 0
                self.losses.append(round(loss, 6))
        self.pending = []
        return last

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, model, shard: bool = False) -> dict:
        """Dev CTC loss per utterance and greedy WER (CHiME-6 rules) of the evaluation model. With
        ``shard`` every rank (each holding the same model) evaluates every K-th utterance and one
        counted all-reduce sums the loss and the error counts, so that no rank idles in a barrier
        while one evaluates (a long evaluation would otherwise run into ``train.collective_timeout``)."""
        model.eval()
        from lhotse import CutSet
        from lhotse.dataset import SimpleCutSampler

        cuts = self.dev_cuts
        if shard:
            cuts = CutSet.from_cuts(list(cuts)[self.dist.rank::self.dist.world_size])
        # world_size 1: lhotse's samplers otherwise read WORLD_SIZE and RANK from the environment and
        # keep every K-th batch only (before this, rank 0 evaluated half the dev set on 2 ranks)
        sampler = SimpleCutSampler(cuts, max_duration=self.tc.max_duration, shuffle=False, world_size=1, rank=0)
        total_loss, utts, pairs = 0.0, 0, []
        for cuts in sampler:
            batch = self.dataset[cuts].to(self.device)
            with self.ctx.autocast():
                logits, out_lens = model(batch.feats, batch.feat_lens)
            total_loss += float(ctc_loss(logits, out_lens, batch.tokens))
            utts += len(batch.tokens)
            for hyp, cut_id in zip(greedy_ctc(logits.float(), out_lens), batch.cut_ids):
                pairs.append((self.dev_cuts[cut_id].supervisions[0].text, self.sp.decode(hyp)))
        errors = corpus_errors(pairs)
        if shard:
            import torch.distributed as tdist

            sums = torch.tensor([total_loss, utts, errors.words, errors.ins, errors.dels, errors.subs],
                                dtype=torch.float64)
            self._count_control(sums)
            tdist.all_reduce(sums)
            total_loss, utts = float(sums[0]), int(sums[1])
            errors = type(errors)(words=int(sums[2]), ins=int(sums[3]), dels=int(sums[4]), subs=int(sums[5]))
        return {"dev_loss": total_loss / max(1, utts), "dev_wer_greedy": errors.wer}

    # ------------------------------------------------------------------ main loop

    def _tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.exp_dir / "tensorboard"), purge_step=self.step or None)
        if self.step == 0:
            import yaml

            self.writer.add_text("config", "```\n" + yaml.safe_dump(self.cfg.to_dict(), sort_keys=False) + "\n```")
            self.writer.add_text("model", "```\n" + self.model.summary() + "\n```")

    def fit(self) -> dict:
        """Train to the end (resuming where a checkpoint is). A collective that fails (a rank died, or
        hung past ``train.collective_timeout``) ends the run with an error naming what this rank was
        doing: the collectives of a step, a checkpoint's barriers, the pause after an evaluation."""
        self.phase = "the start-up agreement on the checkpoint to resume from"
        try:
            return self._fit()
        except RuntimeError as e:
            import torch.distributed as tdist

            comm = isinstance(e, getattr(tdist, "DistError", ())) or _COMM_FAILURE.search(str(e))
            if not self.dist.distributed or isinstance(e, TrainingError) or not comm \
                    or _NAMED_FAILURE.search(str(e)):  # the strategies' own timeouts name their peer already
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainingError(f"{self.phase} failed on rank {self.dist.rank}: {first}; another rank died or "
                                f"did not answer within train.collective_timeout ({self.tc.collective_timeout:g} s)"
                                ) from e

    def _fit(self) -> dict:
        from tqdm import tqdm

        resumed = self.maybe_resume()
        if self.dist.is_main:
            dump_config(self.cfg, self.exp_dir / "config.yaml")
            self._tensorboard()
            if not resumed:
                print(self.model.summary())
                print(f"training {self.cfg.model.name} with strategy {self.cfg.strategy['name']} on "
                      f"{self.dist.world_size} rank(s), {self.device}; {self.filter_stats['kept']} training utterances, "
                      f"{self.batches_per_epoch} batches per epoch per rank, {self.total_steps} steps")
                if self.strategy.describe():
                    print(self.strategy.describe())
        self.t_start = time.time()
        stop = False
        if self.strategy.owns_loop:
            self._run_owned_loop()
            return self._finish()
        while self.epoch < self.tc.epochs and not stop:
            todo, total = self._epoch_rest()
            bar = tqdm(total=total, initial=self.batch_in_epoch, desc=f"epoch {self.epoch + 1}",
                       disable=not self.dist.is_main, unit="batch", leave=True, mininterval=2.0)
            t_log, frames_log = time.time(), 0
            t_iter = time.time()
            batch_iter = iter(loader(self.dataset, todo, self.num_workers, self.device.type == "cuda"))
            self._prefetch_plan(self.epoch + 1)  # after the loader's workers are forked, not before
            for batch in batch_iter:
                c_step = self._compute_clock() if self.slow > 1.0 else 0.0
                self.phase = f"step {self.step + 1}'s collectives ({self.cfg.strategy['name']})"
                out = self.train_step(batch)
                self._straggle(c_step)
                self._inject_fault()
                self.batch_in_epoch += 1
                self.frames_total += out["frames"]
                frames_log += out["frames"]
                bar.update(1)
                self.pending.append(out)
                log_now = self.step % self.tc.log_every_steps == 0
                if self.device.type == "cpu" or log_now:  # on GPU, synchronise only to log
                    last = self._drain()
                    if log_now and self.dist.is_main and last is not None:
                        now = time.time()
                        fps = frames_log / max(1e-9, now - t_log) * self.strategy.replicas
                        self._log_step(last, fps)
                        bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                        t_log, frames_log = now, 0
                checkpoint = self.step % self.tc.checkpoint_every_steps == 0
                if checkpoint:  # pipelines drain: training work, timed as the epoch end's drain is
                    self.pending += self.strategy.prepare_checkpoint(self.ctx)
                self.train_seconds += time.time() - t_iter
                if checkpoint:
                    self.save_checkpoint()
                t_iter = time.time()
                if self.tc.max_steps and self.step >= self.tc.max_steps:
                    stop = True
                    break
            bar.close()
            t_iter = time.time()
            self.pending += self.strategy.end_of_epoch(self.ctx)  # pipelines drain
            self._drain()
            self.train_seconds += time.time() - t_iter
            if not stop:
                self.epoch += 1
                self.batch_in_epoch = 0
                self._end_of_epoch()
                if self.tc.time_limit_minutes and (self.elapsed_before + self._elapsed()) / 60 > self.tc.time_limit_minutes:
                    if self.dist.is_main:
                        print(f"time limit of {self.tc.time_limit_minutes} min reached after epoch {self.epoch}")
                    stop = True
        if stop and self.tc.max_steps:
            self.save_checkpoint()
        return self._finish()

    def _compute_clock(self) -> float:
        """The clock a slow rank's factor scales (``train.slow_ranks``): on CPU with one thread per
        rank, the CPU time of the training thread (``time.thread_time``). A wait inside the step (an
        all-reduce, a server's reply, a peer's gossip) blocks that thread without using it, and gloo
        does its transfers and reductions on threads of its own, so only the step's computation
        counts. With more threads per rank the process's CPU time (gloo's threads and the epoch-plan
        thread included); on GPU the step's wall time after a synchronisation (waits included)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return time.time()
        return time.thread_time() if torch.get_num_threads() == 1 else time.process_time()

    def _slow_basis(self) -> str | None:
        """What ``train.slow_ranks`` scales in this run, for the run summary."""
        if not self.tc.slow_ranks:
            return None
        if self.device.type == "cuda":
            return "step wall time (GPU; waits included)"
        return "training thread CPU time" if torch.get_num_threads() == 1 else "process CPU time"

    def _straggle(self, c_step: float) -> None:
        """A slow rank (``train.slow_ranks``): sleep (factor - 1) times the step's compute time
        (``_compute_clock`` since ``c_step``), so that its computation takes ``factor`` times as long
        as it would, while its waits for others stay what they are."""
        if self.slow > 1.0:
            extra = (self.slow - 1.0) * max(0.0, self._compute_clock() - c_step)
            time.sleep(extra)
            self.slow_seconds += extra

    def _inject_fault(self) -> None:
        """Fault injection for the fault tests (``ASR_PARALLEL_FAULT=kill:RANK:STEP`` or
        ``stop:RANK:STEP``): after its step STEP, rank RANK kills itself with SIGKILL (a crashed rank)
        or stops with SIGSTOP (a hung one). Once per experiment directory (a marker file), so that the
        restarted group runs through."""
        spec = os.environ.get("ASR_PARALLEL_FAULT")
        if not spec:
            return
        try:
            kind, rank, step = spec.split(":")
            rank, step = int(rank), int(step)
        except ValueError:
            raise TrainingError(f"ASR_PARALLEL_FAULT={spec!r}: expected kill:RANK:STEP or stop:RANK:STEP") from None
        marker = self.exp_dir / f".fault-{kind}-{rank}-{step}"
        if self.dist.rank != rank or self.step < step or marker.exists():
            return
        marker.write_text(f"{time.time()}\n")
        say(f"fault injection: rank {rank} at step {self.step}: {kind}")
        os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGSTOP)

    def _run_owned_loop(self) -> None:
        """Strategies without a common step (``owns_loop``): server ranks serve until the end, workers
        train on their shards epoch after epoch (each its own count of batches, no collective; a worker
        whose run length is its own epochs waits for the end once it has made them); every rank joins
        the pauses the strategy calls: an epoch's end (checkpoint, evaluation of the model
        the strategy names, on rank 0), a checkpoint, and the end."""
        st, ctx = self.strategy, self.ctx
        if st.is_server:
            t_log = [time.time(), st.frames_pushed]

            def on_update():
                self.frames_total = st.frames_pushed // max(1, st.replicas)
                if self.dist.is_main and self.step % self.tc.log_every_steps == 0:
                    losses = st.take_losses()
                    now = time.time()
                    fps = (st.frames_pushed - t_log[1]) / max(1e-9, now - t_log[0])
                    t_log[:] = [now, st.frames_pushed]
                    if losses:
                        self.losses += [round(x, 6) for x in losses]
                        self._log_step({"loss": sum(losses) / len(losses), "grad_norm": float("nan")}, fps)

            while True:
                t0 = time.time()
                event = st.serve(ctx, on_update)
                self.train_seconds += time.time() - t0
                if event == "stop":
                    return
                self._pause(event)
        while True:
            if st.worker_finished(self.epoch, self.tc.epochs):  # done with its own passes: wait for the end
                t0 = time.time()
                control = st.wait_for_control()
                self.train_seconds += time.time() - t0
                if control == "stop":
                    return
                if control is not None:
                    self._pause(control)
                continue
            todo, _ = self._epoch_rest(common=False)
            t_iter = time.time()
            for batch in loader(self.dataset, todo, self.num_workers,
                                self.device.type == "cuda"):
                c_step = self._compute_clock() if self.slow > 1.0 else 0.0
                self.phase = f"a worker's step ({self.cfg.strategy['name']}, its step {self.step + 1})"
                out = st.train_step(batch, ctx)
                self._straggle(c_step)
                self._inject_fault()
                self.batch_in_epoch += 1
                self.frames_total += out["frames"]
                self.pending.append(out)
                self._drain()
                self.train_seconds += time.time() - t_iter
                control = out.get("control")
                if control == "stop":
                    return
                if control is not None:
                    self._pause(control)
                t_iter = time.time()
            self.epoch += 1  # a worker's own pass over its shard
            self.batch_in_epoch = 0

    def _pause(self, event: str) -> None:
        """Every rank together: an epoch's end or a checkpoint, named by the strategy's step."""
        step = self.strategy.pause_step
        if event == "epoch":
            if self.strategy.is_server:
                self.epoch += 1  # the server counts epochs of updates; a worker its passes over its shard
            self._end_of_epoch(step)
        elif event == "checkpoint":
            self.save_checkpoint(step)
        else:
            raise TrainingError(f"unknown pause '{event}' from strategy {self.cfg.strategy['name']}")

    def _log_step(self, out: dict, fps: float) -> None:
        w = self.writer
        w.add_scalar("train/loss", out["loss"], self.step)
        w.add_scalar("train/lr", self.scheduler.get_last_lr()[0], self.step)
        w.add_scalar("train/grad_norm", out["grad_norm"], self.step)
        w.add_scalar("train/frames_per_second", fps, self.step)
        comm = self.strategy.comm
        prev_step, prev_bytes = self.comm_logged
        w.add_scalar("comm/bytes_sent", comm.bytes_sent, self.step)
        w.add_scalar("comm/bytes_received", comm.bytes_received, self.step)
        w.add_scalar("comm/bytes_sent_per_step", (comm.bytes_sent - prev_bytes) / max(1, self.step - prev_step),
                     self.step)
        w.add_scalar("comm/collective_calls", comm.calls, self.step)
        for label, (nbytes, _) in comm.by_label.items():
            w.add_scalar(f"comm/bytes_sent_{label}", nbytes, self.step)
        self.comm_logged = (self.step, comm.bytes_sent)
        for name, value in self.strategy.log_scalars().items():
            w.add_scalar(name, value, self.step)
        for name, values in self.strategy.log_histograms().items():
            w.add_histogram(name, torch.tensor(values, dtype=torch.float32), self.step)
        w.add_scalar("train/bad_batches", self.bad_total, self.step)

    def _end_of_epoch(self, step: int | None = None) -> None:
        self.save_checkpoint(step)
        model = self.strategy.eval_model(self.wrapped)  # a collective for pipelines
        has_dev = self.dev_cuts is not None and len(self.dev_cuts) > 0
        # Where every rank holds the same evaluation model (data-parallel strategies, not during a local
        # warm-up), the ranks evaluate a shard each; otherwise rank 0 evaluates all of dev.
        shard = (self.dist.distributed and not self.strategy.owns_step and not self.strategy.owns_loop
                 and self.strategy.eval_replicated())
        if self.dist.is_main:
            ckpt.save_model(self.exp_dir / f"epoch-{self.epoch}.pt", model.state_dict(), {"epoch": self.epoch,
                                                                                          "step": self.step})
        if shard and has_dev:
            self.phase = f"the sharded evaluation after epoch {self.epoch}"
            metrics = self.evaluate(model, shard=True)
        if self.dist.is_main:
            if not shard:
                t0 = time.time()
                metrics = self.evaluate(model) if has_dev else {}
                took = time.time() - t0
                if self.dist.distributed and took > 0.5 * self.tc.collective_timeout:
                    say(f"WARNING: the evaluation on rank 0 took {took:.0f} s, more than half of "
                        f"train.collective_timeout ({self.tc.collective_timeout:g} s), while the other ranks wait "
                        "for it in a barrier: raise train.collective_timeout")
            elif not has_dev:
                metrics = {}
            elapsed = self.elapsed_before + self._elapsed()
            row = {"epoch": self.epoch, "step": self.step, "elapsed_seconds": round(elapsed, 1),
                   "bytes_sent": self.strategy.comm.bytes_sent, **{k: round(v, 4) for k, v in metrics.items()}}
            if metrics:  # how many ranks shared the evaluation (1: rank 0 alone)
                row["dev_eval_ranks"] = self.dist.world_size if shard else 1
            self.history.append(row)
            for k, v in metrics.items():
                self.writer.add_scalar(f"dev/{k}", v, self.step)
            if "dev_wer_greedy" in metrics:
                self.writer.add_scalar("dev_vs_time/wer_greedy", metrics["dev_wer_greedy"], int(elapsed))
            self.writer.flush()
            print(f"epoch {self.epoch}: step {self.step}, {elapsed / 60:.1f} min, "
                  + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        self.phase = f"the barrier after epoch {self.epoch}'s evaluation on rank 0"
        self._barrier()

    def _peak_memory_mb(self) -> float:
        """Peak memory of the busiest rank: GPU memory allocated on GPU, resident set size on CPU."""
        import resource

        if self.device.type == "cuda":
            mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        if self.dist.distributed:
            import torch.distributed as tdist

            t = torch.tensor([mb], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
            self._count_control(t)
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
            mb = float(t.item())
        return round(mb, 1)

    def predicted_comm(self) -> dict:
        """The cost model's bytes and calls per rank for the steps taken (to set beside the counts)."""
        from asr_parallel.strategies.cost import ModelSize, predict

        own = self.strategy.predicted_comm()
        if own is not None:
            return own
        size = ModelSize.of(self.model, self.optimizer)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.dist.world_size))
        figures = self.strategy.summary_figures()
        buckets = [n // size.element_size for n in figures.get("ddp_bucket_bytes", [])]
        return predict(self.cfg.strategy, size, self.dist.world_size, self.step, local, buckets or None,
                       rank=self.dist.rank, bucket_shapes=figures.get("compressed_bucket_shapes"))

    def _gather_rank_figures(self) -> dict:
        """Every rank's wire bytes and call counts, gathered on all ranks (one counted all-reduce).

        ``calls``: what the counter holds for this process; ``process_group_calls``: the process
        groups' own sequence numbers (default group since the trainer started, plus the strategy's
        subgroups) -- the same number when every call is counted; ``node``: the node (torchrun's
        ``GROUP_RANK``) each rank ran on; ``slow_seconds``: what each rank slept as a straggler
        (``train.slow_ranks``); ``strategy_bytes_sent``: the bytes of the strategy's own counted calls
        (the trainer's excluded), each call's size from its tensors (modelled), and
        ``predicted_bytes_sent``: the cost model's figure for the same rank -- a parameter server's
        and its workers' traffic side by side."""
        k, n = self.dist.world_size, 8
        tx, rx = self._wire_now()
        counted = self.strategy.comm.calls - self.calls_offset + 1  # + this gather
        sent = sum(v[0] for label, v in self.strategy.comm.by_label.items() if label != "trainer")
        predicted = self.predicted_comm()["bytes_sent"]
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")  # NCCL: CUDA tensors only
        node = int(os.environ.get("GROUP_RANK", 0))
        v = torch.zeros(n * k, dtype=torch.float64, device=dev)  # exact for integers below 2**53
        v[n * self.dist.rank:n * self.dist.rank + n] = torch.tensor(
            [tx, rx, counted, 0, node, self.slow_seconds, sent, predicted], dtype=torch.float64, device=dev)
        if self.dist.distributed and k > 1:
            import torch.distributed as tdist

            self._count_control(v)
            groups = [None] + list(self.strategy.process_groups())
            measured = process_group_calls(groups) - self.pg_calls_start + 1
            v[n * self.dist.rank + 3] = measured
            tdist.all_reduce(v)
        else:
            v[3] = counted
        rows = v.view(k, n).tolist()
        return {"wire_tx": [int(r[0]) for r in rows], "wire_rx": [int(r[1]) for r in rows],
                "calls": [int(r[2]) for r in rows], "process_group_calls": [int(r[3]) for r in rows],
                "node": [int(r[4]) for r in rows], "slow_seconds": [round(r[5], 2) for r in rows],
                "strategy_bytes_sent": [int(r[6]) for r in rows], "predicted_bytes_sent": [int(r[7]) for r in rows]}

    def _finish(self) -> dict:
        summary = {}
        if getattr(self, "planner", None) is not None:  # a plan for an epoch that will not run: not
            # waited for (one already being drawn still finishes before the process exits)
            self.planner.shutdown(wait=False, cancel_futures=True)
            self.planner = None
        self.strategy.finish(self.ctx)
        current = self.strategy.eval_model(self.wrapped)  # a collective for pipelines
        peak = self._peak_memory_mb()
        ranks = self._gather_rank_figures()
        # torchrun's nodes (its agents; one node when run.sh fell back from emulated nodes)
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", 1))
        if self.dist.is_main:
            epochs = sorted(self.exp_dir.glob("epoch-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
            chosen = epochs[-self.tc.average_last_checkpoints:]
            st = self.strategy
            at_epoch_end = st.version >= st.total_updates if st.owns_loop else self.batch_in_epoch == 0
            if chosen and at_epoch_end:
                state = ckpt.average_models(chosen)
                meta = {"averaged": [p.name for p in chosen], "step": self.step}
            else:  # stopped inside an epoch (max_steps): the current model
                state, meta = current.state_dict(), {"step": self.step}
            ckpt.save_model(self.exp_dir / "final.pt", state, meta)
            summary = {
                "model": self.cfg.model.name, "strategy": self.cfg.strategy, "world_size": self.dist.world_size,
                "fingerprint": self.fingerprint(), "code": code_version(),
                "device": str(self.device), "precision": "bf16" if self.ctx.use_bf16 else "float32",
                "params": self.model.num_params(),
                "flops_per_frame": self.model.flops_per_frame(), "steps": self.step, "epochs": self.epoch,
                "wall_seconds": round(self.elapsed_before + self._elapsed(), 1),
                "train_seconds": round(self.train_seconds, 2), "frames_per_rank": self.frames_total,
                "threads_per_rank": torch.get_num_threads() if self.device.type == "cpu" else None,
                # oneDNN's primitive cache (asr_parallel/__init__.py): it moves CPU step times by 20% or more
                "onednn_primitive_cache": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"),
                "slow_ranks": {str(k): v for k, v in self.tc.slow_ranks.items()},
                "slow_basis": self._slow_basis(),
                "slow_seconds_per_rank": ranks["slow_seconds"],
                "nodes": nodes, "node_of_rank": ranks["node"], "link_rate": self.cfg.train.link_rate if nodes > 1 and self.cfg.train.emulate_nodes > 1 else None,
                "frames_per_second": round(self.frames_total * self.strategy.replicas
                                           / max(1e-9, self.elapsed_before + self._elapsed()), 1),
                # modelled bytes (a formula per counted call), and what the link's counters saw
                "bytes_sent_per_rank": self.strategy.comm.bytes_sent, "collective_calls": self.strategy.comm.calls,
                "bytes_by_label": self.strategy.comm.by_label, "predicted": self.predicted_comm(),
                # every rank's bytes sent by the strategy's counted calls, and the cost model's (a
                # server's and each worker's traffic; rank 0's figures above are one of them)
                "per_rank": {"bytes_sent": ranks["strategy_bytes_sent"],
                             "predicted_bytes_sent": ranks["predicted_bytes_sent"]},
                "wire": {"interface": self.wire_if, "bytes_sent_per_rank": ranks["wire_tx"],
                         "bytes_received_per_rank": ranks["wire_rx"]} if self.wire_if else None,
                "calls_this_process": {"counted": ranks["calls"], "process_group": ranks["process_group_calls"]},
                "bad_batches": self.bad_total, "filtered": self.filter_stats, "history": self.history,
                "peak_memory_mb": peak, "strategy_figures": self.strategy.summary_figures(),
                "losses": self.losses,
            }
            atomic_write_json(self.exp_dir / "train_summary.json", summary)
            if self.writer is not None:
                self.writer.close()
        self._barrier()
        return summary
