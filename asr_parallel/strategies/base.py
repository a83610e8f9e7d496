"""The interface between the trainer and a parallel-training strategy.

The trainer owns data, model, optimiser, schedule, checkpoints and logging. A strategy decides how
the ranks cooperate, at one of two depths:

* around the optimiser step (``owns_step = False``): the trainer runs forward, backward and the
  optimiser step on the model ``wrap_model`` returned; the strategy acts in ``after_optimizer_step``
  (synchronous SGD does its work inside backward through DDP; model averaging, BMUF and EASGD
  average parameters every few steps);
* the whole step (``owns_step = True``): the trainer hands each batch to ``train_step``, which runs
  forward, backward and update itself (pipelines, asynchronous methods).

Every strategy counts every collective call and send it makes, with its modelled bytes (``comm``);
the trainer counts its own calls (epoch lengths, barriers, the final figures) in the same counter.
A strategy keeps its own state in ``state_dict`` (saved in every checkpoint, per rank), and names the
model to evaluate (``eval_model``: the global model for BMUF, the centre for EASGD).

Bytes here are *modelled*: the formula for what a call of that size sends (a ring all-reduce's
2(K-1)/K n b, a send's n b). What really crossed the network is read separately from the
interfaces' counters (:mod:`asr_parallel.utils.netstat`); the number of calls can be checked against
the process group's own sequence number (:func:`process_group_calls`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class DistContext:
    """Where this process stands: rank, world size, device, and the process group (None when alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: object = None
    initialized: bool = False  # a torch.distributed process group exists (torchrun, even with one rank)
    timeout: object = None  # a timedelta: train.collective_timeout, for the strategies' own groups too

    @property
    def distributed(self) -> bool:
        return self.initialized or self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class CommCounter:
    """Modelled bytes this rank sent and received, and the number of calls, per label.

    A ring all-reduce of n values of b bytes over K ranks makes each rank send and receive
    2(K-1)/K * n * b bytes (reduce-scatter, then all-gather). Calls are counted where the tensors
    go through ``torch.distributed`` (their element count, element size and group size), under a label
    (``gradients``, ``params``, ``state``, ``intra``, ``inter``, ``broadcast``, ``ddp_setup``,
    ``trainer`` for the trainer's own calls; for pipelines ``forward``, ``backward``, ``handshake``,
    ``control`` for their per-tick exchange, ``eval`` for gathering the model).
    Every call counts, also those that send (almost) nothing, such as barriers.
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    calls: int = 0
    by_label: dict = field(default_factory=dict)  # label -> [bytes sent, calls]

    def all_reduce(self, numel: int, element_size: int, world_size: int, label: str = "gradients") -> None:
        """Count one ring all-reduce of ``numel`` values over ``world_size`` ranks (a call on a group of
        one rank still counts, with no bytes)."""
        if world_size <= 1:
            self.add(0, 1, label)
            return
        nbytes = ring_allreduce_bytes(numel, element_size, world_size)
        self.add(nbytes, 1, label)
        self.bytes_received += nbytes

    def broadcast(self, numel: int, element_size: int, world_size: int, position: int, label: str = "broadcast",
                  calls: int = 1) -> None:
        """Count a broadcast of ``numel`` values (``position``: this rank's place counted from the root)
        along gloo's binomial tree: every rank but the root receives the values once, and some forward
        them (:func:`broadcast_sends`)."""
        if world_size <= 1:
            self.add(0, calls, label)
            return
        nbytes = numel * element_size
        self.add(nbytes * broadcast_sends(position, world_size), calls, label)
        if position:
            self.bytes_received += nbytes

    def control(self, calls: int = 1, nbytes: int = 0, label: str = "control") -> None:
        """Count small calls that coordinate rather than carry data (barriers, a few flags)."""
        self.add(nbytes, calls, label)
        self.bytes_received += nbytes

    def add(self, nbytes: int, calls: int, label: str) -> None:
        """Count ``calls`` sends of ``nbytes`` bytes in all under ``label``."""
        self.bytes_sent += nbytes
        self.calls += calls
        entry = self.by_label.setdefault(label, [0, 0])
        entry[0] += nbytes
        entry[1] += calls

    def merge(self, state: dict) -> None:
        """Add the counts of another counter's ``state_dict`` to this one's."""
        self.bytes_sent += state["bytes_sent"]
        self.bytes_received += state["bytes_received"]
        self.calls += state["calls"]
        for label, (nbytes, calls) in state.get("by_label", {}).items():
            entry = self.by_label.setdefault(label, [0, 0])
            entry[0] += nbytes
            entry[1] += calls

    def state_dict(self) -> dict:
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received, "calls": self.calls,
                "by_label": {k: list(v) for k, v in self.by_label.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.bytes_sent, self.bytes_received, self.calls = state["bytes_sent"], state["bytes_received"], state["calls"]
        self.by_label = {k: list(v) for k, v in state.get("by_label", {}).items()}


def broadcast_sends(position: int, world_size: int) -> int:
    """Copies a rank sends in gloo's binomial-tree broadcast (``gloo/broadcast.cc``) of K ranks, at
    ``position`` from the root: in round i = 0, 1, ... (2^i < K) every rank r < 2^i sends to r + 2^i
    when that rank exists. The root sends ceil(log2 K) copies; for K = 2, one."""
    sends, m = 0, 1
    while m < world_size:
        if position < m and position + m < world_size:
            sends += 1
        m *= 2
    return sends


def ring_allreduce_bytes(numel: int, element_size: int, world_size: int) -> int:
    """Bytes each rank sends (and receives) in a ring all-reduce: 2(K-1)/K * n * b, rounded down."""
    if world_size <= 1:
        return 0
    return 2 * (world_size - 1) * numel * element_size // world_size


def process_group_calls(groups=(None,)) -> int:
    """The process groups' own count of calls (collectives and, on gloo, sends and receives): their
    sequence numbers, summed over ``groups`` (None: the default group). Read from the system, not from
    the project's accounting, so tests check :class:`CommCounter` against it."""
    import torch.distributed as tdist

    if not tdist.is_initialized():
        return 0
    total = 0
    for g in groups:
        pg = g if g is not None else tdist.distributed_c10d._get_default_group()
        total += int(pg._get_sequence_number_for_group())
    return total


def group_size(group=None) -> int:
    import torch.distributed as tdist

    return tdist.get_world_size(group) if tdist.is_initialized() else 1


def broadcast(tensor: torch.Tensor, counter: CommCounter, src: int = 0, group=None,
              label: str = "broadcast") -> torch.Tensor:
    """``torch.distributed.broadcast`` of ``tensor`` from global rank ``src``, counted in ``counter``."""
    import torch.distributed as tdist

    k = group_size(group)
    if k > 1:
        me = tdist.get_group_rank(group, tdist.get_rank()) if group is not None else tdist.get_rank()
        root = tdist.get_group_rank(group, src) if group is not None else src
        counter.broadcast(tensor.numel(), tensor.element_size(), k, (me - root) % k, label)
        tdist.broadcast(tensor, src=src, group=group)
    return tensor


def all_reduce(tensor: torch.Tensor, counter: CommCounter, group=None, label: str = "params", op=None) -> torch.Tensor:
    """``torch.distributed.all_reduce`` (sum by default) on ``tensor`` in place, counted in ``counter``."""
    import torch.distributed as tdist

    k = group_size(group)
    if k > 1:
        counter.all_reduce(tensor.numel(), tensor.element_size(), k, label)
        tdist.all_reduce(tensor, op=op if op is not None else tdist.ReduceOp.SUM, group=group)
    return tensor


class Strategy:
    """Base class; see the module docstring."""

    name: str = ""
    owns_step: bool = False
    # Strategies without a common step (asynchronous: ``async_ps``) run their own loop: server ranks
    # call ``serve(ctx, on_update)`` until a pause, workers ``train_step`` batch after batch; a step's
    # ``control`` ("epoch", "checkpoint", "stop") tells the trainer when every rank pauses together.
    owns_loop: bool = False
    is_server: bool = False

    @dataclass
    class Params:
        pass

    def __init__(self, params, dist: DistContext):
        self.params = params
        self.dist = dist
        self.comm = CommCounter()

    # -- data: which shard of the training data this rank reads
    def data_shard(self) -> tuple[int, int]:
        return self.dist.rank, self.dist.world_size

    @property
    def replicas(self) -> int:
        """Ranks that each train on frames of their own (for frames per second): all of them for data
        parallelism, one for a pipeline (its ranks share every minibatch)."""
        return self.data_shard()[1]

    # -- model and optimiser
    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once the optimiser exists, before the schedule: may scale learning rates."""

    def schedule_steps(self, batches_per_epoch: int, epochs: int, checkpoint_every: int) -> int:
        """The length of the learning-rate schedule in optimiser steps of this rank (asynchronous
        strategies: server updates)."""
        return batches_per_epoch * epochs

    def eval_model(self, model: nn.Module) -> nn.Module | None:
        """The model to evaluate and save; called on every rank (pipelines gather it on rank 0)."""
        return model

    def eval_replicated(self) -> bool:
        """Whether :meth:`eval_model` is now the same model on every rank (the same on every rank at
        the same step), so that the ranks of a strategy that does not own its step may evaluate a
        shard of dev each; otherwise rank 0 evaluates all of it."""
        return True

    def process_groups(self) -> list:
        """The process groups this strategy communicates over besides the default one (subgroups)."""
        return []

    # -- step hooks (``step`` counts optimiser steps from 1; the step being taken or just taken)
    def averages_gradients(self, step: int) -> bool:
        """Whether this step's gradients are summed over ranks and divided by all ranks' utterances
        (synchronous SGD): the trainer then back-propagates the summed loss and tells the strategy its
        utterance count (:meth:`set_batch_weight`) instead of dividing by it."""
        return False

    def set_batch_weight(self, utterances: int, loss: torch.Tensor) -> None:
        """This rank's utterances and summed loss for the step's gradient all-reduce, which carries
        them: gradients are divided by the utterances of all ranks, and become NaN on every rank when
        any rank's loss is not finite (so every rank skips the step, with no collective of its own)."""

    def forward_context(self, step: int):
        """A context for the forward and backward pass (periodic strategies: DDP's ``no_sync`` after a
        synchronous warm-up)."""
        return nullcontext()

    def after_backward(self, step: int, model: nn.Module) -> None:
        """Gradients are ready and not yet clipped."""

    def after_optimizer_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                             bad: torch.Tensor | None = None) -> None:
        """The update of step ``step`` is done (``bad``: it was skipped on this rank)."""

    def train_step(self, batch, ctx):  # only strategies that own the step implement this
        raise NotImplementedError

    def worker_finished(self, passes: int, epochs: int) -> bool:
        """``owns_loop`` strategies: whether a worker that has made ``passes`` passes over its shard is
        done training and only waits for the end (:meth:`wait_for_control`)."""
        return False

    def wait_for_control(self) -> str | None:
        """``owns_loop`` strategies, a worker done training: the next pause or the end, or None."""
        raise NotImplementedError

    def end_of_epoch(self, ctx) -> list[dict]:
        """All batches of the epoch went in; finish the work in flight (pipelines drain). Returns the
        figures of any further steps, as :meth:`train_step` does."""
        return []

    def prepare_checkpoint(self, ctx) -> list[dict]:
        """A checkpoint is about to be written: bring the state to a point where it can be saved
        (pipelines drain); returns the figures of any further steps."""
        return []

    def finish(self, ctx) -> None:
        """Training is over, before the final evaluation and figures (threads stop here)."""

    def state_lock(self):
        """A context held while the trainer copies the state to save (strategies with a thread that
        changes the model concurrently hold its lock; the state is then copied, not referenced)."""
        return nullcontext()

    def predicted_comm(self) -> dict | None:
        """The cost model's bytes for what this strategy did, where it depends on more than the step
        count (pipelines: the batch shapes); None: the trainer asks :func:`cost.predict`."""
        return None

    def summary_figures(self) -> dict:
        """Figures for the run's summary and the comparison table (pipelines: staleness per stage)."""
        return {}

    def describe(self) -> str:
        """A line for the training log (pipelines: which stages each rank runs)."""
        return ""

    def log_scalars(self) -> dict[str, float]:
        """Strategy-specific figures for TensorBoard (rank 0), e.g. per pipeline stage."""
        return {}

    def log_histograms(self) -> dict[str, list]:
        """Values for TensorBoard histograms since the last log (rank 0; called after log_scalars)."""
        return {}

    # -- checkpoints
    def state_dict(self) -> dict:
        return {"comm": self.comm.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.comm.load_state_dict(state["comm"])
