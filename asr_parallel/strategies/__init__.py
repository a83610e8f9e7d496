"""Parallel-training strategies, chosen in the recipe config: ``strategy: {name: ..., params}``.

Each strategy is its own module with its update rule and paper in the docstring. The registry maps
names to classes; every class has a ``Params`` dataclass listing its parameters, so an unknown name
or parameter stops with a message listing the valid ones.
"""

from __future__ import annotations

import dataclasses
from typing import get_type_hints

from asr_parallel.strategies.ad_psgd import ADPSGD
from asr_parallel.strategies.async_ps import AsyncPS
from asr_parallel.strategies.base import Strategy
from asr_parallel.strategies.bmuf import BMUF
from asr_parallel.strategies.dc_asgd import DCASGD
from asr_parallel.strategies.easgd import EASGD
from asr_parallel.strategies.hierarchical import Hierarchical
from asr_parallel.strategies.hogwild import Hogwild
from asr_parallel.strategies.gpipe import GPipe
from asr_parallel.strategies.model_averaging import ModelAveraging
from asr_parallel.strategies.one_f_one_b import OneFOneB
from asr_parallel.strategies.pipelined_bp import PipelinedBP
from asr_parallel.strategies.single import SingleProcess
from asr_parallel.strategies.sync_sgd import SyncSGD
from asr_parallel.strategies.synthetic_gradients import SyntheticGradients
from asr_parallel.typed import coerce

REGISTRY: dict[str, type[Strategy]] = {cls.name: cls for cls in (SingleProcess, SyncSGD, ModelAveraging, BMUF,
                                                                   EASGD, Hierarchical, PipelinedBP, GPipe,
                                                                   OneFOneB, AsyncPS, DCASGD, ADPSGD, Hogwild,
                                                                   SyntheticGradients)}


def parse_strategy(section: dict):
    """Validate a strategy section; returns the strategy's ``Params`` instance."""
    if not isinstance(section, dict) or "name" not in section:
        raise ValueError(f"key 'strategy' must be a mapping with a 'name' (one of {', '.join(sorted(REGISTRY))})")
    name = section["name"]
    if name not in REGISTRY:
        raise ValueError(f"unknown strategy '{name}'; valid strategies: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    fields = {f.name: f for f in dataclasses.fields(cls.Params)}
    params = {k: v for k, v in section.items() if k != "name"}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        valid = ", ".join(sorted(fields)) or "(none)"
        raise ValueError(f"unknown parameter 'strategy.{unknown[0]}' for strategy '{name}'; valid parameters: {valid}")
    hints = get_type_hints(cls.Params)
    return cls.Params(**{k: coerce(v, hints[k], f"strategy.{k}", "strategy") for k, v in params.items()})


def build_strategy(section: dict, dist) -> Strategy:
    params = parse_strategy(section)
    return REGISTRY[section["name"]](params, dist)


def run_name(section: dict) -> str:
    """A directory/TensorBoard-run name from the strategy and its parameters."""
    params = parse_strategy(section)
    parts = [section["name"]] + [f"{k}{v}" for k, v in sorted(dataclasses.asdict(params).items())
                                 if k in section]
    return "_".join(str(p) for p in parts)
