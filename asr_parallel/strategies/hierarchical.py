"""``hierarchical``: synchronous SGD inside groups of ranks, model averaging or BMUF across groups.

For clusters whose links inside a node are fast and whose links between nodes are slow: the K ranks
form N = K / G groups of G consecutive ranks (a node, by default: torchrun's ``LOCAL_WORLD_SIZE``).
Inside a group, gradients are all-reduced every step (DDP over the group's process group), so the
G ranks of a group hold the same model and act as one worker with G times the batch. Across groups,
the outer rule is model averaging (Zinkevich et al. 2010; Su et al. 2015) or BMUF (Chen and Huo 2016)
every tau steps, between the ranks with the same position in every group (N ranks each), which
averages over all K ranks because the group members are identical. This is the two-level scheme of
Kaldi-style model averaging across machines with synchronous training on each, and of torch's
post-local SGD with ``HierarchicalModelAverager``.

Inside a group the loss is averaged over the group's utterances (the DDP hook of
:mod:`~asr_parallel.strategies.ddp`). Batch-norm statistics are not synchronised by DDP, so at every
outer synchronisation, and at the end of a warm-up, the buffers are first averaged inside the group
(one all-reduce, label ``intra``) and then across groups (with the parameters, or on their own after
the warm-up): the result is their mean over all K ranks.
``scale_lr`` multiplies the learning rate by K: by G for the G-fold batch of a group (the linear
scaling rule) and by N for the averaging of N models (Kaldi nnet3's rule).

Traffic per rank: 2 (G-1)/G * (P + 2 per bucket) * b bytes per step inside the group (label
``intra``), plus 2 (G-1)/G * buffers * b per outer synchronisation when the model has buffers, and
2 (N-1)/N * (P + buffers + 1) * b bytes per outer synchronisation (label ``inter``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from asr_parallel.strategies.base import Strategy, all_reduce
from asr_parallel.strategies.bmuf import BMUF
from asr_parallel.strategies.ddp import bucket_bytes, ddp_wrap, note_rebuild, set_weight
from asr_parallel.strategies.model_averaging import ModelAveraging
from asr_parallel.strategies.periodic import check_period, flatten, float_buffers, unflatten_into

OUTER = {"model_averaging": ModelAveraging, "bmuf": BMUF}


def group_layout(world_size: int, group_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(groups of consecutive ranks, peer sets of the ranks at the same position in every group)."""
    if group_size < 1 or world_size % group_size:
        raise ValueError(f"strategy.group_size {group_size} must divide train.world_size {world_size}")
    n = world_size // group_size
    groups = [[g * group_size + i for i in range(group_size)] for g in range(n)]
    peers = [[g * group_size + i for g in range(n)] for i in range(group_size)]
    return groups, peers


class Hierarchical(Strategy):
    name = "hierarchical"

    @dataclass
    class Params:
        group_size: int = 0  # ranks per group; 0: ranks per node (torchrun's LOCAL_WORLD_SIZE)
        outer: str = "model_averaging"  # model_averaging | bmuf
        sync_period: int = 50  # tau between outer synchronisations
        block_momentum: float = 0.875  # BMUF eta
        block_lr: float = 1.0  # BMUF zeta
        nesterov: bool = False  # BMUF Nesterov block momentum
        warmup_steps: int = 0  # outer synchronous warm-up (group-averaged gradients averaged over groups)
        scale_lr: bool = False  # multiply the learning rate by the number of ranks K
        bucket_cap_mb: float = 0.0  # DDP bucket size inside a group; 0: torch's default

        def __post_init__(self):
            check_period(self)
            if self.outer not in OUTER:
                raise ValueError(f"strategy.outer must be one of {', '.join(OUTER)}, got '{self.outer}'")
            if self.group_size < 0:
                raise ValueError(f"strategy.group_size must be >= 0, got {self.group_size}")

    def __init__(self, params, dist):
        super().__init__(params, dist)
        import torch.distributed as tdist

        if not tdist.is_initialized():
            raise ValueError("strategy 'hierarchical' needs a process group: launch with torchrun "
                             "(train.world_size >= 1 under run.sh's torchrun)")
        size = params.group_size or int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
        groups, peers = group_layout(dist.world_size, size)
        self.group_size, self.num_groups = size, len(groups)
        self.intra, _ = tdist.new_subgroups_by_enumeration(groups, timeout=self.dist.timeout)
        self.inter, _ = tdist.new_subgroups_by_enumeration(peers, timeout=self.dist.timeout)
        cls = OUTER[params.outer]
        names = {f for f in cls.Params.__dataclass_fields__} - {"scale_lr"}
        outer_params = cls.Params(**{k: v for k, v in vars(params).items() if k in names})
        if params.outer == "bmuf":
            outer_params.warmup = "sync"  # the warm-up averages gradients, as this strategy always did
        self.outer = cls(outer_params, dist, group=self.inter, label="inter")
        self.outer.comm = self.comm  # one counter, its labels apart
        self.outer.synchronize = self._synchronize_outer(self.outer.synchronize)
        self.outer.average_buffers_after_warmup = self._average_buffers_after_warmup(
            self.outer.average_buffers_after_warmup)

    def process_groups(self) -> list:
        return [self.intra, self.inter]

    def wrap_model(self, model):
        self.ddp, self.hook = ddp_wrap(model, self.dist, self.comm, self.intra, "intra", self.params.bucket_cap_mb)
        self.outer.wrap_model(self.ddp)  # rank 0 of every peer set broadcasts; the groups already agree
        return self.ddp

    def _average_buffers_in_group(self) -> None:
        bufs = float_buffers(self.outer.module)
        if bufs and self.group_size > 1:
            flat = all_reduce(flatten(bufs), self.comm, self.intra, "intra")
            unflatten_into(flat / self.group_size, bufs)

    def _synchronize_outer(self, synchronize):
        """The outer rule, after the buffers were averaged inside the group (one all-reduce)."""
        def run(step, optimizer):
            self._average_buffers_in_group()
            synchronize(step, optimizer)
        return run

    def _average_buffers_after_warmup(self, across_groups):
        """The end of the synchronous warm-up: buffers averaged inside the group, then across groups
        (their mean over all K ranks), as at every outer synchronisation."""
        def run():
            self._average_buffers_in_group()
            across_groups()
        return run

    def setup_optimizer(self, optimizer) -> None:
        if self.params.scale_lr:
            for group in optimizer.param_groups:
                group["lr"] *= self.dist.world_size

    def averages_gradients(self, step) -> bool:
        return True

    def set_batch_weight(self, utterances, loss) -> None:
        set_weight(self.hook, utterances, loss)

    def after_backward(self, step, model) -> None:
        note_rebuild(self.ddp, self.hook)
        self.outer.after_backward(step, model)

    def after_optimizer_step(self, step, model, optimizer, bad=None) -> None:
        self.outer.after_optimizer_step(step, model, optimizer, bad)

    def log_scalars(self) -> dict:
        return self.outer.log_scalars()

    def summary_figures(self) -> dict:
        return {"ddp_bucket_bytes": bucket_bytes(self.ddp)}

    def eval_model(self, model):
        return self.outer.eval_model(model)

    def eval_replicated(self) -> bool:
        return self.outer.eval_replicated()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "outer": self.outer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.outer.load_state_dict(state["outer"])
        self.outer.comm = self.comm
