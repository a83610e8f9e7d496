"""``async_ps``: asynchronous SGD through a parameter server (Downpour SGD), and its synchronous mode
with backup workers.

Dean, Corrado, Monga, Chen, Devin, Le, Mao, Ranzato, Senior, Tucker, Yang, Ng, "Large scale
distributed deep networks" (NIPS 2012), Downpour SGD: the first ``servers`` ranks hold the master
parameters (whole parameter tensors dealt to the servers in order, balanced by size) and the
optimiser; the other K ranks are workers that train on their own data shards and never wait for each
other. A worker computes the gradient of each minibatch (its mean over the minibatch's utterances)
at the copy of the parameters it holds, adds it to an accumulator, pushes the accumulated gradient
(one sum over ``push_every`` minibatches) to every server and fetches the servers' current
parameters every ``fetch_every`` minibatches. A server applies each push as it arrives:

    w <- opt_step(w, Delta_k)          (the recipe's optimiser: AdamW, or SGD: w - lr * Delta_k)

clipped by the norm of the whole push (the worker sends its squared norm, so that every server
shard scales alike). The staleness of an applied push is the server's version (updates applied so
far) minus the version of that server's shard in the worker's copy when it computed the push (with
``push_every > fetch_every`` a push spans several copies and the newest counts: a lower bound); with
K equal workers it is about K - 1. Every staleness is recorded (mean, max and histogram in the run summary and TensorBoard).

Synchronous mode, ``backup_workers: b >= 0`` (Chen, Pan, Monga, Bengio, Jozefowicz, "Revisiting
distributed synchronous SGD", 2016; TF1's ``SyncReplicasOptimizer``): the server runs rounds; in
each it takes the first K - b gradients computed at its current parameters, averages them weighted
by their utterances, applies the average and answers every fetch with the new parameters; gradients
of an older round are dropped (counted). Workers push and fetch after every minibatch and wait for
the round to end. b = 0 is synchronous SGD (the global utterance mean, as ``sync_sgd``); one server.

Asynchrony and momentum (Mitliagkas, Zhang, Hadjis, Re, "Asynchrony begets momentum, with an
application to deep learning", 2016): K asynchronous workers add an implicit momentum of about
1 - 1/K, so the best explicit momentum falls as K grows. With ``momentum_correction`` the server's
optimiser momentum (SGD ``momentum``, Adam's beta1) is lowered by that amount, not below 0:
mu_explicit = max(0, mu - (1 - 1/K)) (our first-order reading of the paper's result; a sweep is the
way to tune it).

Engine: point-to-point ``torch.distributed`` calls (``isend``/``irecv``) on a gloo process group of
their own, with CPU tensors (NCCL has no receive from any source). On GPU ranks (``train.device``
cuda; the trainer's other calls then go over NCCL) every message is staged through host memory: a
worker copies its gradient shards to the CPU to push them and the fetched parameters back to its
GPU, a server keeps its master shard and optimiser on its GPU and copies each received gradient
there and its parameters to the CPU to send them (tests/test_gpu.py checks the round robin against
the simulator on a GPU; not yet run on one). Models with BatchNorm running statistics are
refused (workers push gradients only, so the master model's statistics would never move).
Servers receive from any source in arrival order (``schedule: arrival``), from the workers in a
fixed rotation (``round_robin``), or in a seeded random order (``seeded``: each update's worker
drawn with ``random.Random(schedule_seed).randrange(K)``, so staleness varies from update to update; while a pause is called, the workers not yet told are taken
in rank order without a draw). The last two are deterministic, for tests and exact comparison with
:mod:`asr_parallel.strategies.delay_sim` (``round_robin``, ``seeded_order``). Per contact a worker sends a header
(what it sends and wants, its version, utterances, loss, squared norm) and, when pushing, its
gradient shard to every server; each server answers with a header (its version and a control word)
and, when asked, its parameter shard. Every send and receive is counted (labels ``push`` and
``pull``, server and worker side), and :meth:`AsyncPS.predicted_comm` predicts them from the
events of the run (contacts, pushes, parameter receives, passes; headers, gradients, replies,
parameter sends): how many of each a run makes depends on the machine's timing, their sizes do not.

Run length: ``train.epochs`` times the updates of one epoch of all workers (K * batches per epoch /
push_every pushes; rounds in synchronous mode), counted on the server, whatever worker makes them,
so a fast worker makes more of them than a slow one; or, with ``run_length: worker_epochs``,
``train.epochs`` passes of every worker over its own shard: each worker makes its own share of the
updates, and one done early asks the server for news every ``poll_seconds`` (a
small header each way, counted) until the slow ones have finished. Every such "epoch" of updates and every
``train.checkpoint_every_steps`` updates all ranks pause together once: the first server tells each
worker at its next contact (control word; a push that arrives after the pause was called is kept
and applied right after the pause, so the pause falls exactly at its update count, and that
worker's next push is one update staler than usual), the worker
passes it on to the other servers, and then
all ranks evaluate (rank 0, the master model) or write a checkpoint (per rank: the server's master
copy, optimiser, version and per-worker bookkeeping; the worker's copy, accumulator and data
position), so a resumed run continues from a consistent state. Exact resume holds for the
deterministic schedules: tested through a stop and resume with ``round_robin`` and with ``seeded``
(its generator's state is in the server's checkpoint). In arrival order
the order after a resume is the machine's.

Faults: every wait for a message has ``timeout`` seconds; a worker that hears nothing from a server
stops with an error naming the server, and a server stops with an error naming the worker that has
been silent longest when any active worker has sent nothing for ``timeout`` seconds (counted from the
start and from the end of every pause, so a pause's evaluation does not count as silence).
"""

from __future__ import annotations

import ast
import datetime
import math
import random
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from asr_parallel.strategies.base import Strategy

# header fields (float64) worker -> server
H_FLAGS, H_VERSION, H_UTTS, H_LOSS, H_SQNORM, H_MINIBATCHES, H_CONTROL, H_PAUSE, H_FRAMES = range(9)
HEADER = 10
PUSH, FETCH, PAUSED, DONE, FINISHED = 1, 2, 4, 8, 16  # flags (FINISHED: the worker made its last minibatch)
# reply fields server -> worker
R_VERSION, R_CONTROL, R_STALENESS, R_PAUSE = range(4)
CONTINUE, EPOCH, CHECKPOINT, STOP = 0, 1, 2, 3
CONTROLS = {CONTINUE: None, EPOCH: "epoch", CHECKPOINT: "checkpoint", STOP: "stop"}
TAG_HEADER, TAG_GRAD, TAG_REPLY, TAG_PARAMS, TAG_EVAL = 11, 12, 13, 14, 15
STALENESS_BINS = 64  # histogram of staleness 0..62, and >= 63 in the last bin


class _Shard(nn.Module):
    """The parameters a server holds (an optimiser over them, a state dict of them)."""

    def __init__(self, params: list[nn.Parameter]):
        super().__init__()
        self.params = nn.ParameterList(params)


def deal(params: list[torch.Tensor], servers: int) -> list[list[int]]:
    """Parameter indices per server: contiguous runs of whole tensors, cut where the running size
    passes s/S of the total (every server gets at least one tensor)."""
    if servers > len(params):
        raise ValueError(f"strategy.servers ({servers}) exceeds the model's {len(params)} parameter tensors")
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    out, start, acc = [], 0, 0
    for s in range(1, servers):
        target = total * s / servers
        end = start + 1
        acc += sizes[start]
        while end < len(params) - (servers - s) and acc + sizes[end] / 2 <= target:
            acc += sizes[end]
            end += 1
        out.append(list(range(start, end)))
        start = end
    out.append(list(range(start, len(params))))
    return out


class AsyncPS(Strategy):
    name = "async_ps"
    owns_step = True
    owns_loop = True

    @dataclass
    class Params:
        servers: int = 1  # server ranks (the first ones), each holding a share of the parameters
        push_every: int = 1  # minibatches whose gradients a worker sums before pushing
        fetch_every: int = 1  # minibatches between fetches of the parameters
        schedule: Literal["arrival", "round_robin", "seeded"] = "arrival"
        schedule_seed: int = 0  # schedule seeded: the random order's seed
        backup_workers: int = -1  # -1: asynchronous; b >= 0: synchronous rounds of the first K - b gradients
        momentum_correction: bool = False  # lower the optimiser's momentum by 1 - 1/K (Mitliagkas et al.)
        # the run's length: "updates", train.epochs epochs' worth of all workers' pushes, whoever makes them;
        # "worker_epochs", train.epochs passes of every worker over its own shard (a worker done early waits)
        run_length: Literal["updates", "worker_epochs"] = "updates"
        poll_seconds: float = 0.5  # worker_epochs: a finished worker asks the server for news this often
        timeout: float = 300.0  # seconds any rank waits for a message before stopping with an error

        def __post_init__(self):
            for key in ("servers", "push_every", "fetch_every"):
                if getattr(self, key) < 1:
                    raise ValueError(f"strategy.{key} must be >= 1, got {getattr(self, key)}")
            if self.backup_workers < -1:
                raise ValueError(f"strategy.backup_workers must be -1 (asynchronous) or >= 0, got {self.backup_workers}")
            if self.backup_workers >= 0 and (self.push_every != 1 or self.fetch_every != 1 or self.servers != 1):
                raise ValueError("strategy.backup_workers >= 0 (synchronous rounds) needs push_every 1, fetch_every 1 "
                                 "and one server")
            if self.backup_workers >= 0 and self.schedule != "arrival":
                raise ValueError("strategy.backup_workers >= 0 takes the first gradients to arrive; schedule "
                                 f"{self.schedule} waits for each worker in turn: use schedule arrival")
            if self.timeout <= 0:
                raise ValueError(f"strategy.timeout must be > 0, got {self.timeout}")
            if self.schedule == "seeded" and self.servers > 1:
                raise ValueError("strategy.schedule seeded needs one server: the others also receive the workers' "
                                 "word of each pause, and their draws would part from the first server's")
            if self.run_length == "worker_epochs" and self.backup_workers >= 0:
                raise ValueError("strategy.run_length worker_epochs is for the asynchronous server: synchronous "
                                 "rounds (backup_workers >= 0) need every worker in every round; use updates")
            if self.run_length == "worker_epochs" and self.schedule != "arrival":
                raise ValueError(f"strategy.run_length worker_epochs: a worker done early would hold up the {self.schedule} "
                                 "schedule (each turn waits for its next poll); use schedule arrival")
            if not 0 < self.poll_seconds < self.timeout:
                raise ValueError(f"strategy.poll_seconds must be > 0 and below timeout, got {self.poll_seconds}")

    def __init__(self, params, dist):
        super().__init__(params, dist)
        p = params
        self.servers = p.servers
        self.workers = dist.world_size - p.servers
        if self.workers < 1:
            raise ValueError(f"strategy async_ps: {dist.world_size} rank(s) leave no worker besides "
                             f"{p.servers} server(s); set train.world_size >= servers + 1")
        if p.backup_workers >= max(1, self.workers):
            raise ValueError(f"strategy.backup_workers ({p.backup_workers}) must be below the {self.workers} workers")
        self.is_server = dist.rank < p.servers
        self.worker_index = dist.rank - p.servers
        self.timeout = datetime.timedelta(seconds=p.timeout)
        self.group = None
        self.version = 0  # server: updates applied; worker: the version of its copy from the first server
        self.versions = [0] * p.servers  # worker: the version of each server's shard it holds
        # server bookkeeping
        self.last_contact = [0.0] * max(1, self.workers)
        self.notified = [False] * max(1, self.workers)  # told about the pending pause (or passed it on)
        self.pending: str | None = None  # "epoch" | "checkpoint" | "stop" awaiting every worker
        self.pause_step = 0  # the server's version when the current pause was called (names checkpoints)
        self.checkpoints_done = 0
        self.next_worker = 0  # round robin
        self.order_rng = random.Random(p.schedule_seed)  # schedule seeded
        self.pushes = [0] * max(1, self.workers)
        self.dropped = 0  # gradients of an older round (synchronous mode) or after the end
        self.staleness_hist = [0] * STALENESS_BINS
        self.staleness_sum = 0
        self.staleness_max = 0
        self.recent_staleness: list[int] = []
        self.recent_losses: list[float] = []
        self.total_updates = 0  # set by the trainer (run length)
        self.stop_at = 0  # updates after which the run stops (the total, or train.max_steps)
        self.updates_per_epoch = 0
        self.checkpoint_every = 0
        self.epochs_done = 0
        self.epochs = 0  # the run's epochs (train.epochs)
        self.finished = [False] * max(1, self.workers)  # worker_epochs: workers past their last minibatch
        self.round: list = []  # synchronous mode: (worker, gradient, utterances) of this round
        # (worker, header, gradient, basis) of pushes that arrived while a pause was called; basis: what
        # ``push_basis`` kept for the push at its arrival (DC-ASGD: the w_bak[k] it was computed at)
        self.deferred: list = []
        self.waiting_fetch: list[int] = []  # synchronous mode: workers waiting for the round's end
        # worker state
        self.acc: list[torch.Tensor] | None = None
        self.acc_utts = 0
        self.acc_loss = 0.0
        self.acc_minibatches = 0
        self.acc_frames = 0
        self.frames_pushed = 0  # server: frames of the minibatches pushed to it
        self.local_steps = 0
        self.idle = 0.0  # seconds waiting on a server (worker) or for a message (server)
        # what this rank did, for the cost model (predicted_comm)
        self.events = {"contacts": 0, "pushes": 0, "param_recvs": 0, "passes": 0, "headers": 0, "grads": 0,
                       "replies": 0, "params": 0, "evals": 0}

    # -- set-up
    def data_shard(self) -> tuple[int, int]:
        return max(0, self.worker_index), self.workers

    @property
    def replicas(self) -> int:
        return max(1, self.workers)

    def process_groups(self) -> list:
        return [self.group] if self.group is not None else []

    def wrap_model(self, model: nn.Module) -> nn.Module:
        import torch.distributed as tdist

        self.model = model
        params = list(model.parameters())
        self.shards = deal(params, self.servers)
        self.shard_params = [[params[i] for i in idx] for idx in self.shards]
        self.shard_numel = [sum(p.numel() for p in ps) for ps in self.shard_params]
        running = sorted({n.rsplit(".", 1)[0] for n, b in model.named_buffers() if n.endswith("running_mean")})
        if running:
            raise ValueError(f"strategy {self.name}: the model has running statistics ({', '.join(running[:3])}"
                             f"{', ...' if len(running) > 3 else ''}: BatchNorm) that workers do not push, so the "
                             "server's master model would be evaluated and saved with its initial statistics; use "
                             "a normalisation without them (model.conformer.conv_norm: layer or group)")
        # a gloo group of its own for the point-to-point traffic (tags apart from the default group's
        # collectives); created through the rendezvous store, no gloo call
        self.group = tdist.new_group(backend="gloo", timeout=self.dist.timeout)
        # every rank builds the same initial model (the trainer seeds them alike): no broadcast
        if self.is_server:
            return _Shard(self.shard_params[self.dist.rank])
        return model

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if not (self.params.momentum_correction and self.is_server):
            return
        implicit = 1.0 - 1.0 / max(1, self.workers)
        for g in optimizer.param_groups:
            if "betas" in g:
                b1, b2 = g["betas"]
                g["betas"] = (max(0.0, b1 - implicit), b2)
            elif "momentum" in g:
                g["momentum"] = max(0.0, g["momentum"] - implicit)
        self.explicit_momentum = [g.get("betas", (g.get("momentum"),))[0] for g in optimizer.param_groups][0]

    def schedule_steps(self, batches_per_epoch: int, epochs: int, checkpoint_every: int) -> int:
        """The run length in server updates (the schedule's length): ``epochs`` times the updates of
        one epoch of every worker's minibatches."""
        per_epoch = batches_per_epoch if self.params.backup_workers >= 0 else \
            max(1, self.workers) * batches_per_epoch // self.params.push_every
        self.updates_per_epoch = max(1, per_epoch)
        self.total_updates = self.stop_at = self.updates_per_epoch * epochs
        if self.params.run_length == "worker_epochs":  # each worker pushes its rest once it has finished
            self.total_updates = self.stop_at = max(1, self.workers) * math.ceil(
                batches_per_epoch * epochs / self.params.push_every)
        self.epochs = epochs
        self.checkpoint_every = checkpoint_every
        return self.total_updates

    # -- messages
    def _post(self, fn, tensor, peer, tag, what):
        try:
            return fn(tensor, peer, group=self.group, tag=tag)
        except RuntimeError as e:
            self._fail(what, peer, e)

    def _wait(self, work, what: str, peer) -> None:
        t0 = time.perf_counter()
        try:
            work.wait(timeout=self.timeout)
        except RuntimeError as e:
            self._fail(what, peer, e)
        self.idle += time.perf_counter() - t0

    def _fail(self, what: str, peer, e: Exception):
        me = f"server (rank {self.dist.rank})" if self.is_server else f"worker {self.worker_index} (rank {self.dist.rank})"
        if peer is None:
            source = "any worker"
        else:
            role = "server" if peer < self.servers else f"worker {peer - self.servers}"
            source = f"{role} (rank {peer})"
        raise RuntimeError(f"async_ps {me}: no {what} from {source} within {self.params.timeout:.0f} s, or the "
                           f"connection broke; has it died or hung? ({e})") from e

    def _send(self, tensor, dst, tag, label, what):
        import torch.distributed as tdist

        self.comm.add(tensor.numel() * tensor.element_size(), 1, label)
        return self._post(tdist.isend, tensor, dst, tag, what)

    def _recv(self, tensor, src, tag, label, what):
        """Receive into ``tensor`` from ``src`` (None: any rank); returns the source rank."""
        import torch.distributed as tdist

        work = self._post(tdist.irecv, tensor, src, tag, what)
        self._wait(work, what, src)
        self.comm.add(0, 1, label)
        self.comm.bytes_received += tensor.numel() * tensor.element_size()
        return work._source_rank() if src is None else src

    # -- worker
    def _flat_grads(self, server: int) -> torch.Tensor:
        out = []
        for p in self.shard_params[server]:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            out.append(g.detach().reshape(-1).to("cpu", torch.float32))
        return torch.cat(out)

    def train_step(self, batch, ctx) -> dict:
        from asr_parallel.train.loss import ctc_loss, host_output_lengths

        if self.is_server:
            raise RuntimeError("async_ps: train_step called on a server rank")
        model = self.model
        model.train()
        batch = batch.to(ctx.device)
        n = len(batch.tokens)
        ctx.optimizer.zero_grad(set_to_none=True)
        with ctx.autocast():
            logits, out_lens = model(ctx.augment(batch.feats), batch.feat_lens)
        loss_sum = ctc_loss(logits, host_output_lengths(model, out_lens, batch.lens_on_host), batch.tokens)
        (loss_sum / n).backward()
        grads = [self._flat_grads(s) for s in range(self.servers)]
        sq = float(sum(g.double().pow(2).sum() for g in grads))
        loss = float(loss_sum.detach()) / n
        bad = not (math.isfinite(loss) and math.isfinite(sq))
        if not bad:
            if self.acc is None:
                self.acc = [torch.zeros_like(g) for g in grads]
            for a, g in zip(self.acc, grads):
                a += g
            self.acc_utts += n
            self.acc_loss += loss * n
            self.acc_minibatches += 1
            self.acc_frames += int(batch.num_frames)
        self.local_steps += 1
        push = self.local_steps % self.params.push_every == 0
        fetch = self.local_steps % self.params.fetch_every == 0
        control = self._contact(push, fetch) if push or fetch else None
        ctx.advance()
        return {"bad": torch.tensor([1.0 if bad else 0.0]), "loss": torch.tensor(loss),
                "grad_norm": torch.tensor(sq ** 0.5), "frames": batch.num_frames, "cut_ids": batch.cut_ids,
                "control": control}

    def worker_finished(self, passes: int, epochs: int) -> bool:
        """Whether a worker that has made ``passes`` passes over its shard is done training
        (``run_length: worker_epochs``); with ``updates`` the server's count of updates ends the run."""
        return self.params.run_length == "worker_epochs" and passes >= epochs

    def wait_for_control(self) -> str | None:
        """A worker done training (``run_length: worker_epochs``): push what it still holds, tell the
        servers it has finished, and return the first server's word: a pause to join, the end, or None
        (nothing yet: it asks again after ``poll_seconds``, so the servers still hear from it)."""
        control = self._contact(push=self.acc_utts > 0, fetch=False, finished=True)
        if control is None:
            time.sleep(self.params.poll_seconds)
        return control

    def _contact(self, push: bool, fetch: bool, finished: bool = False) -> str | None:
        """One exchange with every server: header (+ accumulated gradient), reply (+ parameters)."""
        sync = self.params.backup_workers >= 0
        flags = (PUSH if push and self.acc_utts > 0 else 0) | (FETCH if fetch or sync else 0)
        flags |= FINISHED if finished else 0
        if sync and push:
            flags |= PUSH  # a round counts every worker: an empty push (only bad minibatches) says so
        control = None
        sends = []
        self.events["contacts"] += 1
        self.events["pushes"] += bool(flags & PUSH)
        for s in range(self.servers):
            header = torch.zeros(HEADER, dtype=torch.float64)
            sq = float(sum(a.double().pow(2).sum() for a in self.acc)) if self.acc is not None else 0.0
            header[H_FLAGS], header[H_VERSION], header[H_UTTS] = flags, self.versions[s], self.acc_utts
            header[H_LOSS], header[H_SQNORM], header[H_MINIBATCHES] = self.acc_loss, sq, self.acc_minibatches
            header[H_FRAMES] = self.acc_frames
            sends.append((self._send(header, s, TAG_HEADER, "push", "send of a header to"), s, header))
            if flags & PUSH:
                g = self.acc[s] if self.acc is not None else torch.zeros(self.shard_numel[s])
                sends.append((self._send(g, s, TAG_GRAD, "push", "send of a gradient to"), s, g))
        for s in range(self.servers):
            reply = torch.zeros(HEADER, dtype=torch.float64)
            self._recv(reply, s, TAG_REPLY, "pull", "reply")
            if flags & FETCH or reply[R_CONTROL] != CONTINUE:
                self.events["param_recvs"] += 1  # per server: a pause's word comes from the first only
                flat = torch.empty(self.shard_numel[s], dtype=torch.float32)
                self._recv(flat, s, TAG_PARAMS, "pull", "parameters")
                self._load_shard(s, flat)
                self.versions[s] = int(reply[R_VERSION])
                if s == 0:
                    self.version = int(reply[R_VERSION])
            if s == 0:
                control = CONTROLS[int(reply[R_CONTROL])]
                self.pause_step = int(reply[R_PAUSE])
                self.control_code = int(reply[R_CONTROL])
        for work, s, _ in sends:  # (the tensor is held until its send completes)
            self._wait(work, "acknowledgement of a send to", s)
        if flags & PUSH or (sync and push):
            self.acc = None
            self.acc_utts, self.acc_loss, self.acc_minibatches, self.acc_frames = 0, 0.0, 0, 0
        if control is not None and self.servers > 1:
            self._pass_on(control)
        return control

    def _pass_on(self, control: str) -> None:
        """Tell the other servers that the first one called a pause (or the end)."""
        flags = DONE if control == "stop" else PAUSED
        self.events["passes"] += 1
        for s in range(1, self.servers):
            header = torch.zeros(HEADER, dtype=torch.float64)
            header[H_FLAGS], header[H_VERSION] = flags, self.version
            header[H_CONTROL], header[H_PAUSE] = self.control_code, self.pause_step
            work = self._send(header, s, TAG_HEADER, "push", "send of a header to")
            self._wait(work, "acknowledgement of a send to", s)

    def _load_shard(self, s: int, flat: torch.Tensor) -> None:
        o = 0
        with torch.no_grad():
            for p in self.shard_params[s]:
                n = p.numel()
                p.copy_(flat[o:o + n].view_as(p))
                o += n

    # -- server
    def _shard_flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).to("cpu", torch.float32)
                          for p in self.shard_params[self.dist.rank]])

    def serve(self, ctx, on_update=None) -> str:
        """Serve the workers until the next pause: returns "epoch", "checkpoint" or "stop", when every
        worker has been told (the first server) or has passed it on (the others). ``on_update()`` is
        called after every update (the trainer's logging)."""
        coordinator = self.dist.rank == 0
        # silence counts from the start of the run or of this serving spell: a pause (evaluation,
        # checkpoint) holds every worker, and a worker that dies before its first contact is named too
        self.last_contact = [time.time()] * self.workers
        deferred, self.deferred = self.deferred, []
        for k, header, grad, basis in deferred:  # pushes that arrived after the last pause was called
            self._apply_push(k, header, grad, ctx, basis)
            if on_update is not None:
                on_update()
        while True:
            if self.pending is not None and all(self.notified):
                event, self.pending = self.pending, None
                self.notified = [False] * self.workers
                return event
            if coordinator:
                self._maybe_pause()
                if self.pending is not None and all(self.notified):
                    continue
            k, header = self._next_header()
            flags = int(header[H_FLAGS])
            self.events["headers"] += 1
            if flags & (PAUSED | DONE):  # a worker passing the first server's word on
                self.notified[k] = True
                self.pending = CONTROLS[int(header[H_CONTROL])]
                self.pause_step = int(header[H_PAUSE])
                continue
            staleness = None
            version = self.version
            if flags & FINISHED:
                self.finished[k] = True
            if flags & PUSH:
                grad = torch.empty(self.shard_numel[self.dist.rank], dtype=torch.float32)
                self._recv(grad, self.servers + k, TAG_GRAD, "push", "gradient")
                self.events["grads"] += 1
                staleness = self._arrive(k, header, grad, ctx)
            if self.params.backup_workers >= 0 and flags & FETCH and int(header[H_VERSION]) >= self.version \
                    and not self._ending():
                self.waiting_fetch.append(k)  # answered when the round ends
                if self._round_done():
                    self._finish_round(ctx)
                    if on_update is not None:
                        on_update()
                continue
            if coordinator:
                self._maybe_pause()  # before the reply, so that the worker whose push ended an epoch hears it
            self._reply(k, flags, staleness)
            if on_update is not None and self.version != version:
                on_update()

    def _ending(self) -> bool:
        return self.pending == "stop" or self._stop_due()

    def _stop_due(self) -> bool:
        """The updates reached ``stop_at`` (the schedule's total, or ``train.max_steps``); with
        ``run_length: worker_epochs`` only a max_steps stop counts (that run ends when every worker has
        finished its epochs)."""
        if self.params.run_length == "worker_epochs" and self.stop_at >= self.total_updates:
            return False
        return self.version >= self.stop_at

    def _next_header(self) -> tuple[int, torch.Tensor]:
        header = torch.zeros(HEADER, dtype=torch.float64)
        active = [k for k in range(self.workers) if not self.notified[k]] or list(range(self.workers))
        if self.params.schedule == "round_robin":
            while self.next_worker not in active:
                self.next_worker = (self.next_worker + 1) % self.workers
            k = self.next_worker
            self.next_worker = (k + 1) % self.workers
            self._recv(header, self.servers + k, TAG_HEADER, "push", "header")
        elif self.params.schedule == "seeded":
            k = active[0] if self.pending is not None else self.order_rng.randrange(self.workers)
            self._recv(header, self.servers + k, TAG_HEADER, "push", "header")
        else:
            try:
                src = self._recv(header, None, TAG_HEADER, "push", "message")
            except RuntimeError as e:  # nothing from anyone, or a connection broke: name the silent one
                raise self._silent(active, e) from e
            k = src - self.servers
        now = time.time()
        self.last_contact[k] = now
        silent = [j for j in active if j != k and now - self.last_contact[j] > self.params.timeout]
        if silent:
            raise self._silent(silent)
        return k, header

    def _silent(self, workers: list[int], cause: Exception | None = None) -> RuntimeError:
        """The error naming the worker of ``workers`` silent longest."""
        now = time.time()
        j = min(workers, key=lambda i: self.last_contact[i])
        since = f"for {now - self.last_contact[j]:.0f} s"
        return RuntimeError(f"async_ps server (rank {self.dist.rank}): worker {j} (rank {self.servers + j}) has sent "
                            f"nothing {since} (timeout {self.params.timeout:.0f} s), or its connection broke; has it "
                            f"died or hung?" + (f" ({cause})" if cause else ""))

    def _arrive(self, k: int, header: torch.Tensor, grad: torch.Tensor, ctx) -> int | None:
        """A worker's push: applied at once (asynchronous), or kept for the round (synchronous)."""
        version = int(header[H_VERSION])
        utts = int(header[H_UTTS])
        self.pushes[k] += 1
        self.frames_pushed += int(header[H_FRAMES])
        if self._ending() or (self.params.backup_workers >= 0 and version < self.version):
            self.dropped += 1
            return None
        if utts > 0:
            self.recent_losses.append(float(header[H_LOSS]) / utts)
        if self.params.backup_workers >= 0:
            self.round.append((k, grad, utts))
            return None
        if utts == 0:
            return None
        if self.pending in ("epoch", "checkpoint"):  # after the pause: the pause is at its own step
            # the reply to this contact hands worker k the current parameters (``on_fetch``) before the
            # push is applied: keep what the push was computed at, for its application after the pause
            self.deferred.append((k, header.clone(), grad, self.push_basis(k)))
            return None
        return self._apply_push(k, header, grad, ctx)

    def _apply_push(self, k: int, header: torch.Tensor, grad: torch.Tensor, ctx, basis=None) -> int:
        staleness = self.version - int(header[H_VERSION])
        grad = self.correct(k, grad, basis)
        self._apply(ctx, grad, float(header[H_SQNORM]) ** 0.5)
        self._record(staleness)
        return staleness

    def correct(self, k: int, grad: torch.Tensor, basis=None) -> torch.Tensor:
        """The gradient the server applies for worker k's push (DC-ASGD compensates it here); ``basis``:
        what ``push_basis(k)`` returned when a deferred push arrived (None: the push is applied on arrival)."""
        return grad

    def push_basis(self, k: int):
        """What the server must keep of worker k's state for a push applied later than its arrival
        (nothing here; DC-ASGD: the parameters the push was computed at)."""
        return None

    def _record(self, staleness: int) -> None:
        self.staleness_hist[min(staleness, STALENESS_BINS - 1)] += 1
        self.staleness_sum += staleness
        self.staleness_max = max(self.staleness_max, staleness)
        self.recent_staleness.append(staleness)

    def _apply(self, ctx, flat: torch.Tensor, norm: float) -> None:
        """One optimiser step of this server's shard with gradient ``flat`` (its whole push's norm:
        ``norm``), and the schedule."""
        o = 0
        for p in self.shard_params[self.dist.rank]:
            n = p.numel()
            p.grad = flat[o:o + n].view_as(p).to(p.device, p.dtype).clone()
            o += n
        device = self.shard_params[self.dist.rank][0].device
        ctx.clip(self.shard_params[self.dist.rank], torch.tensor(norm, dtype=torch.float32))
        # on the parameters' device: a fused optimiser (GPU) reads its skip flag there
        bad = torch.full((1,), 0.0 if math.isfinite(norm) else 1.0, device=device)
        ctx.apply(bad)
        ctx.advance()
        self.version += 1

    def _round_done(self) -> bool:
        need = self.workers - self.params.backup_workers
        return len(self.round) >= need and len(self.waiting_fetch) >= need

    def _finish_round(self, ctx) -> None:
        """Synchronous mode: average the first K - b gradients of the round (by utterances), apply,
        answer every waiting fetch."""
        need = self.workers - self.params.backup_workers
        used = self.round[:need]
        self.dropped += len(self.round) - need
        utts = sum(u for _, _, u in used)
        if utts > 0:
            g = sum(grad * u for _, grad, u in used) / utts
            self._apply(ctx, g, float(g.double().pow(2).sum()) ** 0.5)
            for _ in used:
                self._record(0)
        else:  # every used gradient was empty (bad minibatches): the round makes no update
            self.version += 1
            ctx.advance()
        self.round = []
        waiting, self.waiting_fetch = self.waiting_fetch, []
        self._maybe_pause()
        for k in waiting:
            self._reply(k, FETCH, 0)

    def _reply(self, k: int, flags: int, staleness: int | None) -> None:
        control = CONTINUE
        if self.dist.rank == 0 and self.pending is not None and not self.notified[k]:
            control = {"epoch": EPOCH, "checkpoint": CHECKPOINT, "stop": STOP}[self.pending]
            self.notified[k] = True
        reply = torch.zeros(HEADER, dtype=torch.float64)
        reply[R_VERSION], reply[R_CONTROL] = self.version, control
        reply[R_STALENESS] = -1 if staleness is None else staleness
        reply[R_PAUSE] = self.pause_step
        dst = self.servers + k
        works = [(self._send(reply, dst, TAG_REPLY, "pull", "send of a reply to"), reply)]
        self.events["replies"] += 1
        if flags & FETCH or control != CONTINUE:
            self.events["params"] += 1
            flat = self._shard_flat()
            works.append((self._send(flat, dst, TAG_PARAMS, "pull", "send of the parameters to"), flat))
            self.on_fetch(k, flat)
        for work, _ in works:
            self._wait(work, "acknowledgement of a send to", dst)

    def on_fetch(self, k: int, flat: torch.Tensor) -> None:
        """Worker k now holds ``flat`` (DC-ASGD keeps it as w_bak[k])."""

    def _maybe_pause(self) -> None:
        """The first server: call a pause when the updates reach an epoch's end, a checkpoint or the end."""
        if self.pending is not None:
            return
        v = self.version
        # worker_epochs: the epochs before the last end at their update counts, as with updates; the last
        # ends, and then the run, once every worker has made its last minibatch and pushed it (a worker
        # whose minibatches had a non-finite loss pushed fewer: the epochs not reached end together there)
        by_workers = self.params.run_length == "worker_epochs"
        all_done = by_workers and all(self.finished)
        last = self.epochs_done + 1 >= self.epochs  # worker_epochs: the last epoch ends when all have finished
        if (v >= self.updates_per_epoch * (self.epochs_done + 1) and not (by_workers and last)) or \
                (all_done and self.epochs_done < self.epochs):
            self.pending = "epoch"
            self.epochs_done = self.epochs if all_done else self.epochs_done + 1
        elif all_done or self._stop_due():
            self.pending = "stop"
        elif self.checkpoint_every and v // self.checkpoint_every > self.checkpoints_done:
            self.pending = "checkpoint"
        else:
            return
        if self.checkpoint_every:  # an epoch's end writes a checkpoint too
            self.checkpoints_done = v // self.checkpoint_every
        self.pause_step = v

    # -- evaluation: the master model, gathered on rank 0
    def eval_model(self, model: nn.Module) -> nn.Module | None:
        if self.servers > 1 and self.is_server:
            self.events["evals"] += 1
            if self.dist.rank == 0:
                for s in range(1, self.servers):
                    flat = torch.empty(self.shard_numel[s], dtype=torch.float32)
                    self._recv(flat, s, TAG_EVAL, "eval", "model shard")
                    self._load_shard(s, flat)
            else:
                flat = self._shard_flat()
                self._wait(self._send(flat, 0, TAG_EVAL, "eval", "send of a model shard to"), "acknowledgement", 0)
        return self.model if self.dist.rank == 0 else None

    def predicted_comm(self) -> dict:
        """The cost model's calls and bytes for the messages this rank's events imply (a worker's
        contacts, pushes, parameter receives and passes; a server's headers, gradients, replies, parameter sends
        and evaluation gathers), from the shard sizes: headers of HEADER (10) float64, 80 bytes; float32 values."""
        e, S, h = self.events, self.servers, HEADER * 8
        numel = self.shard_numel
        by_label: dict[str, list[int]] = {}
        if not self.is_server:
            by_label["push"] = [e["contacts"] * S * h + e["pushes"] * sum(numel) * 4 + e["passes"] * (S - 1) * h,
                                e["contacts"] * S + e["pushes"] * S + e["passes"] * (S - 1)]
            by_label["pull"] = [0, e["contacts"] * S + e["param_recvs"]]
        else:
            me = self.dist.rank
            by_label["push"] = [0, e["headers"] + e["grads"]]
            by_label["pull"] = [e["replies"] * h + e["params"] * numel[me] * 4, e["replies"] + e["params"]]
            if S > 1:
                by_label["eval"] = [0 if me == 0 else e["evals"] * numel[me] * 4,
                                    e["evals"] * (S - 1 if me == 0 else 1)]
        return {"bytes_sent": sum(v[0] for v in by_label.values()), "calls": sum(v[1] for v in by_label.values()),
                "by_label": by_label}

    # -- figures
    def summary_figures(self) -> dict:
        if not self.is_server:
            return {"worker_idle_seconds": round(self.idle, 2)}
        n = sum(self.staleness_hist)
        out = {"updates": self.version, "updates_per_epoch": self.updates_per_epoch,
               "pushes_per_worker": list(self.pushes), "dropped": self.dropped,
               "staleness_mean": round(self.staleness_sum / n, 4) if n else 0.0, "staleness_max": self.staleness_max,
               "staleness_histogram": list(self.staleness_hist), "server_idle_seconds": round(self.idle, 2)}
        if self.params.momentum_correction:
            out["explicit_momentum"] = getattr(self, "explicit_momentum", None)
        return out

    def log_scalars(self) -> dict[str, float]:
        out = {}
        if self.recent_staleness:
            out["async/staleness_mean"] = sum(self.recent_staleness) / len(self.recent_staleness)
            out["async/staleness_max"] = max(self.recent_staleness)
        out["async/dropped"] = self.dropped
        for k, n in enumerate(self.pushes):
            out[f"async/pushes_worker{k}"] = n
        return out

    def log_histograms(self) -> dict[str, list]:
        """The staleness of every push applied since the last log (TensorBoard's histogram)."""
        out = {"async/staleness": self.recent_staleness} if self.recent_staleness else {}
        self.recent_staleness = []
        return out

    def take_losses(self) -> list[float]:
        """The server: the losses of the pushes since the last call (for the training-loss log)."""
        out, self.recent_losses = self.recent_losses, []
        return out

    # -- checkpoints
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["async_ps"] = {
            "version": self.version, "pushes": list(self.pushes),
            "dropped": self.dropped, "staleness_hist": list(self.staleness_hist),
            "staleness_sum": self.staleness_sum, "staleness_max": self.staleness_max,
            "next_worker": self.next_worker, "order_rng": repr(self.order_rng.getstate()),
            "epochs_done": self.epochs_done, "versions": list(self.versions),
            "checkpoints_done": self.checkpoints_done, "local_steps": self.local_steps,
            "acc": self.acc, "acc_utts": self.acc_utts, "acc_loss": self.acc_loss,
            "acc_minibatches": self.acc_minibatches, "acc_frames": self.acc_frames,
            "frames_pushed": self.frames_pushed, "idle": self.idle, "events": dict(self.events),
            "pause_step": self.pause_step, "finished": list(self.finished), "epochs": self.epochs,
            "deferred": [{"worker": k, "header": h, "grad": g, "basis": b} for k, h, g, b in self.deferred],
        }
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        a = state["async_ps"]
        self.version, self.pushes = a["version"], list(a["pushes"])
        self.dropped, self.staleness_hist = a["dropped"], list(a["staleness_hist"])
        self.staleness_sum, self.staleness_max = a["staleness_sum"], a["staleness_max"]
        self.next_worker, self.epochs_done = a["next_worker"], a["epochs_done"]
        if "order_rng" in a:  # (absent before the seeded schedule)
            self.order_rng.setstate(ast.literal_eval(a["order_rng"]))
        self.versions = list(a.get("versions", [self.version] * self.servers))
        self.checkpoints_done, self.local_steps = a["checkpoints_done"], a["local_steps"]
        self.acc, self.acc_utts, self.acc_loss = a["acc"], a["acc_utts"], a["acc_loss"]
        self.acc_minibatches, self.idle = a["acc_minibatches"], a["idle"]
        self.acc_frames, self.frames_pushed = a["acc_frames"], a["frames_pushed"]
        self.events, self.pause_step = dict(a["events"]), a["pause_step"]
        if "param_recvs" not in self.events:  # a checkpoint of before the count per server
            self.events["param_recvs"] = self.events.pop("fetches", 0) * self.servers
        if a.get("epochs") == self.epochs:  # a resume with more epochs: every worker has more to do
            self.finished = list(a.get("finished", self.finished))
        self.deferred = [(d["worker"], d["header"], d["grad"], d.get("basis")) for d in a.get("deferred", [])]
