"""Shared machinery of the strategies whose ranks train locally and synchronise every ``tau`` steps.

Model averaging, BMUF and EASGD (and the outer level of ``hierarchical``) differ only in what they
compute at a synchronisation; this base class holds what they share:

* the start: every rank begins from rank 0's model (one broadcast of parameters and buffers, or
  DDP's own broadcast when the warm-up is synchronous);
* the warm-up (``warmup_steps`` W, ``warmup``): ``sync``, W steps of synchronous SGD through DDP
  (:mod:`asr_parallel.strategies.ddp`: overlapped bucketed all-reduces, the loss averaged over all
  ranks' utterances), after which DDP's ``no_sync`` keeps every later step local; or
  ``local_broadcast``, fairseq's BMUF warm-up (``optim/bmuf.py``, ``_warmup_sync``): W local steps
  on every rank, then one broadcast of rank 0's parameters and buffers, and the optimiser's state
  reset (fairseq reloads the optimiser's initial state unless ``average_sync``). After a synchronous
  warm-up the floating buffers (batch-norm statistics, which DDP does not synchronise) are averaged
  once (one all-reduce, label ``state``);
* the schedule: a synchronisation after every ``sync_period`` local steps: after step s when s > W
  and (s - W) % tau == 0. Between two synchronisations a rank makes no collective call at all:
  a step with a non-finite loss or gradient is skipped locally, and the count of such steps travels
  in the next synchronisation's all-reduce (one more value), so the run's total over all ranks is
  known without a per-step collective;
* one all-reduce per synchronisation of the parameters, the floating-point buffers (batch-norm
  statistics, averaged as Kaldi's model averaging does), any extra state, and the bad-step count;
* the *global* model, a copy holding the result of the last synchronisation, which is what the
  trainer evaluates and saves per epoch (the local models differ between synchronisations).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from asr_parallel.strategies.base import DistContext, Strategy, all_reduce, broadcast, group_size

WARMUPS = ("sync", "local_broadcast")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def flatten(tensors) -> torch.Tensor:
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(0)
    return torch.cat([t.detach().reshape(-1).to(tensors[0].dtype) for t in tensors])


def unflatten_into(flat: torch.Tensor, tensors) -> None:
    """Copy consecutive slices of ``flat`` into ``tensors``, in place (storage unchanged)."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.data.copy_(flat[offset:offset + n].view_as(t))
        offset += n
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} values, the tensors {offset}")


def check_period(params) -> None:
    """Validate ``sync_period``, ``warmup_steps`` and ``warmup`` of a strategy's parameters."""
    if params.sync_period < 1:
        raise ValueError(f"strategy.sync_period must be >= 1, got {params.sync_period}")
    if getattr(params, "warmup_steps", 0) < 0:
        raise ValueError(f"strategy.warmup_steps must be >= 0, got {params.warmup_steps}")
    if getattr(params, "warmup", "sync") not in WARMUPS:
        raise ValueError(f"strategy.warmup must be one of {', '.join(WARMUPS)}, got '{params.warmup}'")


def float_buffers(module: nn.Module) -> list[torch.Tensor]:
    return [b for b in module.buffers() if b.is_floating_point()]


def root_rank(group) -> int:
    """The global rank of the group's first member (the broadcast source)."""
    import torch.distributed as tdist

    return tdist.get_global_rank(group, 0) if group is not None else 0


class PeriodicSync(Strategy):
    """Base class: see the module docstring. ``Params`` must have ``sync_period`` (and may have
    ``warmup_steps`` and ``warmup``)."""

    def __init__(self, params, dist: DistContext, group=None, label: str = "params"):
        super().__init__(params, dist)  # the Params checked sync_period and warmup_steps
        self.group = group  # None: all ranks
        self.label = label
        self.module: nn.Module | None = None
        self.global_model: nn.Module | None = None
        self.ddp = None  # DDP for a synchronous warm-up
        self.saved_buckets = None  # its buckets as a checkpoint recorded them, or as read once rebuilt
        self.buckets_read = False  # saved_buckets read from this process's rebuilt DDP
        self.hook = None
        self.step = 0  # the last optimiser step seen
        self.bad_since_sync = torch.zeros(())  # this rank's skipped steps since the last synchronisation
        self.bad_all_ranks = 0  # skipped steps of all ranks, as of the last synchronisation

    # -- schedule
    @property
    def warmup_steps(self) -> int:
        return int(getattr(self.params, "warmup_steps", 0))

    @property
    def warmup(self) -> str:
        return str(getattr(self.params, "warmup", "sync"))

    @property
    def k(self) -> int:
        """Ranks in the synchronisation group."""
        return group_size(self.group)

    def is_sync_step(self, step: int) -> bool:
        w, tau = self.warmup_steps, self.params.sync_period
        return step > w and (step - w) % tau == 0

    def process_groups(self) -> list:
        return [self.group] if self.group is not None else []

    # -- model
    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Every rank starts from rank 0's model; a synchronous warm-up wraps the model in DDP (unless
        it already is one: ``hierarchical`` averages gradients inside groups itself)."""
        self.module = unwrap(model)
        if self.k > 1:
            if self.warmup_steps and self.warmup == "sync" and model is self.module:
                from asr_parallel.strategies.ddp import ddp_wrap

                self.ddp, self.hook = ddp_wrap(model, self.dist, self.comm, self.group, "gradients")
                # DDP's construction broadcast rank 0's parameters (not its buffers: broadcast_buffers is
                # off); the buffers start equal (every rank builds the model alike) and are averaged
                # at the warm-up's end
                model = self.ddp
            else:
                self.broadcast_model()
        self.global_model = copy.deepcopy(self.module).requires_grad_(False)
        self.init_state()
        return model

    def broadcast_model(self) -> None:
        """Rank 0's parameters and floating buffers to every rank of the group (one broadcast)."""
        tensors = self.params_list() + float_buffers(self.module)
        flat = flatten(tensors)
        broadcast(flat, self.comm, root_rank(self.group), self.group, "broadcast")
        unflatten_into(flat, tensors)

    def init_state(self) -> None:
        """Set up the strategy's state from the (identical on every rank) current model."""

    def params_list(self) -> list[torch.Tensor]:
        return list(self.module.parameters())

    def eval_model(self, model: nn.Module) -> nn.Module:
        # During the warm-up rank 0's current model (identical on every rank when synchronous);
        # afterwards the global one.
        return unwrap(model) if self.step <= self.warmup_steps else self.global_model

    def eval_replicated(self) -> bool:
        # during a local warm-up (fairseq's) each rank's own model is evaluated: they differ
        return not (self.step <= self.warmup_steps and self.warmup == "local_broadcast" and self.k > 1)

    def set_global_from_local(self) -> None:
        self.global_model.load_state_dict(self.module.state_dict())

    # -- steps
    def in_sync_warmup(self, step: int) -> bool:
        return step <= self.warmup_steps and self.warmup == "sync" and self.k > 1

    def averages_gradients(self, step: int) -> bool:
        return self.ddp is not None and self.in_sync_warmup(step)

    def set_batch_weight(self, utterances, loss) -> None:
        from asr_parallel.strategies.ddp import set_weight

        set_weight(self.hook, utterances, loss)

    def forward_context(self, step: int):
        if self.ddp is not None and not self.in_sync_warmup(step):
            return self.ddp.no_sync()  # local steps: DDP all-reduces nothing
        return super().forward_context(step)

    def after_backward(self, step: int, model: nn.Module) -> None:
        """Synchronous warm-up: DDP averaged the gradients (count its bucket rebuild); for a model that
        was already a DDP over a subgroup (``hierarchical``), average them over this group here."""
        if self.ddp is not None:
            from asr_parallel.strategies.ddp import note_rebuild

            note_rebuild(self.ddp, self.hook)  # also in the first local step after a one-step warm-up
            return
        if not self.in_sync_warmup(step):
            return
        params = [p for p in self.params_list() if p.grad is not None]
        flat = flatten(p.grad for p in params)
        all_reduce(flat, self.comm, self.group, "gradients")
        flat /= self.k
        unflatten_into(flat, [p.grad for p in params])

    def after_optimizer_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                             bad: torch.Tensor | None = None) -> None:
        self.step = step
        if bad is not None:
            self.bad_since_sync = self.bad_since_sync.to(bad.device) + bad.reshape(())
        if self.warmup_steps and step == self.warmup_steps:
            self.end_warmup(optimizer)
        elif self.is_sync_step(step):
            self.synchronize(step, optimizer)

    def end_warmup(self, optimizer: torch.optim.Optimizer) -> None:
        """The warm-up is over: blocks start from the common current model (fairseq's broadcast of
        rank 0's model and reset of the optimiser's state after a local warm-up)."""
        if self.warmup == "local_broadcast" and self.k > 1:
            self.broadcast_model()
            optimizer.state.clear()
        else:
            # the synchronous warm-up's skipped steps were agreed by every rank: count them once
            self.bad_all_ranks += int(round(float(self.bad_since_sync)))
            self.bad_since_sync = torch.zeros(())
            self.average_buffers_after_warmup()
        self.set_global_from_local()
        self.init_state()

    def average_buffers_after_warmup(self) -> None:
        """DDP kept the parameters equal but not the batch-norm statistics: average them once."""
        bufs = float_buffers(self.module)
        if self.k > 1 and bufs:
            flat = all_reduce(flatten(bufs), self.comm, self.group, "state")
            unflatten_into(flat / self.k, bufs)

    def synchronize(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        raise NotImplementedError

    def allreduce_model(self, extra: list[torch.Tensor] = ()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sum over the group of this rank's parameters, floating buffers and ``extra`` tensors, with
        the bad-step count riding along (one all-reduce); returns (summed parameters, summed buffers,
        summed extras) as flat vectors."""
        params, bufs = self.params_list(), float_buffers(self.module)
        n, m = sum(p.numel() for p in params), sum(b.numel() for b in bufs)
        flat = torch.cat([flatten(params + bufs + list(extra)), self.bad_since_sync.reshape(1).to(params[0].dtype)
                          .to(params[0].device)])
        all_reduce(flat, self.comm, self.group, self.label)
        self.bad_all_ranks += int(round(float(flat[-1])))
        self.bad_since_sync = torch.zeros(())
        return flat[:n], flat[n:n + m], flat[n + m:-1]

    def log_scalars(self) -> dict[str, float]:
        return {"train/bad_batches_all_ranks": float(self.bad_all_ranks)}

    def warmup_buckets(self) -> list[int] | None:
        """The synchronous warm-up's DDP buckets, in bytes: as DDP rebuilt them in this process, else as
        a resumed run's checkpoint recorded them (a run resumed after its warm-up never runs DDP again,
        and DDP's unrebuilt layout is not the one the warm-up used)."""
        if self.ddp is None:
            return None
        from asr_parallel.strategies.ddp import bucket_bytes

        if self.hook.rebuilt and not self.buckets_read:  # final once rebuilt: read once (reading allocates)
            self.saved_buckets, self.buckets_read = bucket_bytes(self.ddp), True
        return list(self.saved_buckets) if self.saved_buckets else bucket_bytes(self.ddp)

    def summary_figures(self) -> dict:
        out = {"bad_batches_all_ranks": self.bad_all_ranks}
        buckets = self.warmup_buckets()
        if buckets is not None:
            out["ddp_bucket_bytes"] = buckets
        return out

    # -- checkpoints
    def state_dict(self) -> dict:
        return {**super().state_dict(), "step": self.step, "global_model": self.global_model.state_dict(),
                "bad_since_sync": self.bad_since_sync.cpu(), "bad_all_ranks": self.bad_all_ranks,
                "ddp_bucket_bytes": self.warmup_buckets()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.saved_buckets = state.get("ddp_bucket_bytes")
        self.step = state["step"]
        self.global_model.load_state_dict(state["global_model"])
        self.bad_since_sync = state.get("bad_since_sync", torch.zeros(()))
        self.bad_all_ranks = state.get("bad_all_ranks", 0)
