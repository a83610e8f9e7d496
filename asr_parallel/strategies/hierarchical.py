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

Traffic per rank: 2 (G-1)/G * P * b bytes per step inside the group (label ``intra``) and
2 (N-1)/N * P' * b bytes per outer synchronisation (label ``inter``; P' also counts the buffers for
BMUF and the separate buffer all-reduce for model averaging).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from asr_parallel.strategies.base import Strategy
from asr_parallel.strategies.bmuf import BMUF
from asr_parallel.strategies.model_averaging import ModelAveraging
from asr_parallel.strategies.periodic import check_period
from asr_parallel.strategies.sync_sgd import ddp_wrap

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
        warmup_steps: int = 0  # outer synchronous warm-up (gradients averaged over all ranks)
        bucket_cap_mb: float = 25.0  # DDP bucket size inside a group

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
        self.intra, _ = tdist.new_subgroups_by_enumeration(groups)
        self.inter, _ = tdist.new_subgroups_by_enumeration(peers)
        cls = OUTER[params.outer]
        names = {f for f in cls.Params.__dataclass_fields__}
        outer_params = cls.Params(**{k: v for k, v in vars(params).items() if k in names})
        self.outer = cls(outer_params, dist, group=self.inter, label="inter")
        self.outer.comm = self.comm  # one counter, two labels

    def wrap_model(self, model):
        ddp = ddp_wrap(model, self.dist, self, self.intra, "intra", self.params.bucket_cap_mb)
        self.outer.wrap_model(ddp)
        return ddp

    def setup_optimizer(self, optimizer) -> None:
        self.outer.setup_optimizer(optimizer)

    def after_backward(self, step, model) -> None:
        self.outer.after_backward(step, model)

    def after_optimizer_step(self, step, model, optimizer) -> None:
        self.outer.after_optimizer_step(step, model, optimizer)

    def eval_model(self, model):
        return self.outer.eval_model(model)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "outer": self.outer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.outer.load_state_dict(state["outer"])
        self.outer.comm = self.comm
