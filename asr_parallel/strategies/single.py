"""``single``: one process, no parallelism: the baseline every strategy is compared with."""

from __future__ import annotations

from dataclasses import dataclass

from asr_parallel.strategies.base import Strategy


class SingleProcess(Strategy):
    name = "single"

    @dataclass
    class Params:
        pass

    def __init__(self, params, dist):
        if dist.world_size != 1:
            raise ValueError(f"strategy 'single' runs one process, but train.world_size is {dist.world_size}")
        super().__init__(params, dist)
