"""What the pipeline strategies share: cutting the model across ranks, point-to-point messages
between neighbouring stages, gathering the model for evaluation, and per-stage accounting.

A model is an ordered list of stages mapping ``(x, lengths)`` to ``(x, lengths)``
(:mod:`asr_parallel.models.base`). A pipeline of S ranks gives each rank a contiguous *part* of that
list: balanced by parameter count or by forward FLOPs (the cut that minimises the heaviest part),
or at explicit boundaries from the config. Rank s runs part s; part 0 reads the features, the
last part computes the CTC loss. Every rank reads the same batches (one data stream), so the
targets and lengths of every minibatch are at hand on the last stage without being sent.

Messages: speech batches have variable length, so an activation travels as a fixed-size header
(batch, time, feature dims, dtype), then the lengths (int64), then the values; its gradient travels back
with the shape the receiver already knows. Every receive waits at most ``recv_timeout`` seconds, so
a stage that died makes its neighbours stop with an error naming it instead of hanging.
Bytes per boundary and direction are counted as they are sent (:func:`boundary_bytes` predicts them).
"""

from __future__ import annotations

import datetime
import time

import torch
from torch import nn

from asr_parallel.strategies.base import CommCounter, Strategy

HEADER = 4  # int64 values ahead of every activation: batch, time, feature dims, dtype code
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def partition(weights: list[float], parts: int) -> list[int]:
    """Start indices of ``parts`` contiguous groups of ``weights`` minimising the heaviest group
    (dynamic programming; ties go to the earliest cut). Every group gets at least one item."""
    n = len(weights)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot cut {n} model stages into {parts} pipeline parts")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]  # best[p][i]: first i items in p groups
    choice = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for p in range(1, parts + 1):
        for i in range(p, n + 1):
            for j in range(p - 1, i):
                cost = max(best[p - 1][j], prefix[i] - prefix[j])
                if cost < best[p][i] - 1e-12:
                    best[p][i], choice[p][i] = cost, j
    starts, i = [], n
    for p in range(parts, 0, -1):
        i = choice[p][i]
        starts.append(i)
    return starts[::-1]


def model_cut(model, parts: int, balance: str = "flops", boundaries: list[int] | None = None) -> list[int]:
    """Start stage index of every part: explicit ``boundaries`` (the starts of parts 1..S-1), or balanced."""
    n = len(model.stages)
    if boundaries:
        starts = [0] + list(boundaries)
        if len(starts) != parts or starts != sorted(set(starts)) or starts[-1] >= n or starts[1] <= 0:
            raise ValueError(f"strategy.boundaries {boundaries} must be {parts - 1} increasing stage indices in "
                             f"1..{n - 1} (the model's stages: {', '.join(model.stage_names)})")
        return starts
    info = model.stage_info()
    if balance == "params":
        weights = [float(s.params) for s in info]
    elif balance == "flops":
        weights = [s.flops_per_frame for s in info]
    else:
        raise ValueError(f"strategy.balance must be 'params' or 'flops', got '{balance}'")
    weights = [w + 1e-9 * sum(weights) for w in weights]  # parameter-free stages still weigh a little
    return partition(weights, parts)


class Part(nn.Module):
    """The stages one rank runs, in order (the same module objects as in the full model)."""

    def __init__(self, model, start: int, stop: int):
        super().__init__()
        self.stages = nn.ModuleList(list(model.stages)[start:stop])
        self.start, self.stop = start, stop

    def forward(self, x, lengths):
        for stage in self.stages:
            x, lengths = stage(x, lengths)
        return x, lengths


def boundary_shapes(model, starts: list[int], batch: int, frames: int) -> list[tuple[int, int, int]]:
    """(batch, time, dims) of the activation crossing each boundary, for a padded batch of ``frames``."""
    shapes, t = [], torch.tensor([frames])
    cuts = set(starts[1:])
    for i, stage in enumerate(model.stages):
        t = stage.output_lengths(t)
        if i + 1 in cuts:
            shapes.append((batch, int(t), stage.output_dim))
    return shapes


def boundary_bytes(model, starts: list[int], batch: int, frames: int, element_size: int = 4,
                   header: bool = True) -> list[dict]:
    """Bytes over every boundary for one (micro-)batch: forward, the activation values (and with
    ``header`` the shape header and the lengths, as ``pipelined_bp`` sends them); backward, the
    gradient of the activation."""
    out = []
    for b, t, d in boundary_shapes(model, starts, batch, frames):
        values = b * t * d * element_size
        out.append({"forward": (HEADER * 8 + b * 8 if header else 0) + values, "backward": values})
    return out


class PipelineStrategy(Strategy):
    """Base class of the pipeline strategies: each rank owns one part of the model."""

    owns_step = True

    def __init__(self, params, dist):
        super().__init__(params, dist)
        self.num_parts = dist.world_size
        self.part_index = dist.rank
        self.timeout = datetime.timedelta(seconds=float(params.recv_timeout))
        self.reset_figures()

    # -- data: every rank reads the same batches
    def data_shard(self) -> tuple[int, int]:
        return 0, 1

    @property
    def first(self) -> bool:
        return self.part_index == 0

    @property
    def last(self) -> bool:
        return self.part_index == self.num_parts - 1

    def wrap_model(self, model: nn.Module) -> nn.Module:
        self.model = model
        self.starts = model_cut(model, self.num_parts, self.params.balance, list(self.params.boundaries))
        bounds = self.starts + [len(model.stages)]
        self.part = Part(model, bounds[self.part_index], bounds[self.part_index + 1])
        self.bytes_forward = [0] * (self.num_parts - 1)
        self.bytes_backward = [0] * (self.num_parts - 1)
        self.predicted = CommCounter()
        return self.part

    def describe(self) -> str:
        names = self.model.stage_names
        bounds = self.starts + [len(names)]
        return "; ".join(f"rank {p}: {', '.join(names[bounds[p]:bounds[p + 1]])}" for p in range(self.num_parts))

    # -- the cost model's prediction of this rank's sends, accumulated per (micro-)batch
    def predict_sends(self, batch: int, frames: int, times: int = 1, header: bool = True) -> None:
        per = boundary_bytes(self.model, self.starts, batch, frames, header=header)
        if not self.last:
            self.predicted.add(times * per[self.part_index]["forward"], times * (3 if header else 1), "forward")
        if not self.first:
            self.predicted.add(times * per[self.part_index - 1]["backward"], times, "backward")

    def predicted_comm(self) -> dict:
        p = self.predicted
        return {"bytes_sent": p.bytes_sent, "calls": p.calls, "by_label": p.by_label}

    # -- messages
    def _post(self, op, tensor: torch.Tensor, peer: int, what: str):
        """``isend`` or ``irecv``, with a broken connection reported as :meth:`_wait` does."""
        try:
            return op(tensor, peer)
        except RuntimeError as e:
            self._fail(what, peer, e)

    def _wait(self, work, what: str, peer: int) -> None:
        try:
            work.wait(timeout=self.timeout)
        except RuntimeError as e:
            self._fail(what, peer, e)

    def _fail(self, what: str, peer: int, e: Exception):
        source = f"stage {peer} (rank {peer})" if peer >= 0 else "the other stages"
        raise RuntimeError(f"pipeline stage {self.part_index}: no {what} {'' if what.endswith(' to') else 'from '}"
                           f"{source} within {self.timeout.total_seconds():.0f} s, or the connection broke; "
                           f"has a stage died? ({e})") from e

    def send_activation(self, x: torch.Tensor, lengths: torch.Tensor) -> list:
        import torch.distributed as tdist

        dst = self.part_index + 1
        header = torch.tensor(list(x.shape) + [DTYPES.index(x.dtype)], dtype=torch.int64, device=x.device)
        lengths = lengths.to(torch.int64)
        x = x.detach().contiguous()
        works = [self._post(tdist.isend, t, dst, "send of an activation to") for t in (header, lengths, x)]
        nbytes = header.numel() * 8 + lengths.numel() * 8 + x.numel() * x.element_size()
        self.bytes_forward[self.part_index] += nbytes
        self.comm.add(nbytes, 3, "forward")
        return works + [header, lengths, x]  # keep the buffers alive until the sends complete

    def recv_activation(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        import torch.distributed as tdist

        src = self.part_index - 1
        t0 = time.perf_counter()
        header = torch.empty(HEADER, dtype=torch.int64, device=device)
        self._wait(self._post(tdist.irecv, header, src, "activation header"), "activation header", src)
        b, t, d, code = (int(v) for v in header.tolist())
        lengths = torch.empty(b, dtype=torch.int64, device=device)
        x = torch.empty(b, t, d, dtype=DTYPES[code], device=device)
        self._wait(self._post(tdist.irecv, lengths, src, "lengths"), "lengths", src)
        self._wait(self._post(tdist.irecv, x, src, "activation"), "activation", src)
        nbytes = (HEADER + b) * 8 + x.numel() * x.element_size()
        self.comm.bytes_received += nbytes
        self.idle += time.perf_counter() - t0
        return x, lengths

    def send_gradient(self, grad: torch.Tensor) -> list:
        import torch.distributed as tdist

        grad = grad.contiguous()
        self.bytes_backward[self.part_index - 1] += grad.numel() * grad.element_size()
        self.comm.add(grad.numel() * grad.element_size(), 1, "backward")
        return [self._post(tdist.isend, grad, self.part_index - 1, "send of a gradient to"), grad]

    def recv_gradient(self, shape, device, dtype=torch.float32) -> torch.Tensor:
        import torch.distributed as tdist

        src = self.part_index + 1
        t0 = time.perf_counter()
        grad = torch.empty(shape, dtype=dtype, device=device)
        self._wait(self._post(tdist.irecv, grad, src, "gradient"), "gradient", src)
        self.comm.bytes_received += grad.numel() * grad.element_size()
        self.idle += time.perf_counter() - t0
        return grad

    def finish_sends(self, pending: list) -> None:
        for item in pending:
            if not torch.is_tensor(item):
                self._wait(item, "acknowledgement of a send", -1)

    def summary_figures(self) -> dict:
        """The largest measured staleness per stage (the steady-state delay) and the idle fraction."""
        f = getattr(self, "figures", None) or {}
        idle = [i / (b + i) if b + i > 0 else 0.0 for b, i in zip(f.get("busy", []), f.get("idle", []))]
        return {"staleness": list(getattr(self, "max_staleness", [])), "idle_fraction": idle,
                "bytes_forward": f.get("bytes_forward"), "bytes_backward": f.get("bytes_backward")}

    def log_scalars(self) -> dict[str, float]:
        f = getattr(self, "figures", None)
        if not f:
            return {}
        out = {}
        for s in range(self.num_parts):
            total = f["busy"][s] + f["idle"][s]
            out[f"pipeline/busy_seconds_stage{s}"] = f["busy"][s]
            out[f"pipeline/idle_seconds_stage{s}"] = f["idle"][s]
            out[f"pipeline/idle_fraction_stage{s}"] = f["idle"][s] / total if total > 0 else 0.0
            out[f"pipeline/staleness_stage{s}"] = f["staleness"][s]
        for b in range(self.num_parts - 1):
            out[f"pipeline/bytes_forward_boundary{b}"] = f["bytes_forward"][b]
            out[f"pipeline/bytes_backward_boundary{b}"] = f["bytes_backward"][b]
        return out

    # -- figures shared with rank 0 once per step (one small all-reduce)
    def reset_figures(self) -> None:
        self.busy = 0.0
        self.idle = 0.0

    def exchange(self, mine: dict) -> dict:
        """One all-reduce (sum) of the step's figures: this rank's ``loss`` (last stage), ``bad`` flag,
        squared gradient norm, and its own slot of the per-stage ``busy``, ``idle`` and ``staleness``
        and the per-boundary ``bytes_forward`` and ``bytes_backward``. Every rank learns them all."""
        import torch.distributed as tdist

        s = self.num_parts
        sizes = {"loss": 1, "has_loss": 1, "bad": 1, "sq_norm": 1, "busy": s, "idle": s, "staleness": s,
                 "bytes_forward": s - 1, "bytes_backward": s - 1}
        v = torch.zeros(sum(sizes.values()), dtype=torch.float64)
        offsets, o = {}, 0
        for k, n in sizes.items():
            offsets[k] = o
            o += n
        if mine.get("loss") is not None:
            v[offsets["loss"]], v[offsets["has_loss"]] = float(mine["loss"]), 1.0
        v[offsets["bad"]] = float(mine.get("bad", False))
        v[offsets["sq_norm"]] = float(mine.get("sq_norm", 0.0))
        v[offsets["busy"] + self.part_index] = self.busy
        v[offsets["idle"] + self.part_index] = self.idle
        v[offsets["staleness"] + self.part_index] = float(mine.get("staleness", 0.0))
        if s > 1:
            v[offsets["bytes_forward"]:offsets["bytes_forward"] + s - 1] += torch.tensor(self.bytes_forward,
                                                                                        dtype=torch.float64)
            v[offsets["bytes_backward"]:offsets["bytes_backward"] + s - 1] += torch.tensor(self.bytes_backward,
                                                                                          dtype=torch.float64)
            try:
                work = tdist.all_reduce(v, async_op=True)
            except RuntimeError as e:
                self._fail("step figures", -1, e)
            self._wait(work, "step figures", -1)
        out = {k: v[offsets[k]:offsets[k] + n].tolist() for k, n in sizes.items()}
        self.max_staleness = [max(a, b) for a, b in zip(getattr(self, "max_staleness", [0.0] * s), out["staleness"])]
        for k in ("loss", "has_loss", "bad", "sq_norm"):
            out[k] = out[k][0]
        out["loss"] = out["loss"] if out["has_loss"] > 0 else None
        out["bad"] = out["bad"] > 0
        return out

    # -- evaluation: the whole model on rank 0
    def eval_model(self, model: nn.Module) -> nn.Module | None:
        """Collective: every rank sends its part's parameters and buffers to rank 0, which returns the
        whole model (others return None). Not counted as training traffic."""
        import torch.distributed as tdist

        from asr_parallel.strategies.periodic import flatten, unflatten_into

        if self.num_parts == 1:
            return self.model
        bounds = self.starts + [len(self.model.stages)]
        for p in range(1, self.num_parts):
            tensors = [t for i in range(bounds[p], bounds[p + 1]) for t in
                       list(self.model.stages[i].parameters()) + [b for b in self.model.stages[i].buffers()
                                                                  if b.is_floating_point()]]
            if not tensors:
                continue
            if self.part_index == p:
                tdist.send(flatten(tensors).contiguous(), 0)
            elif self.first:
                flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
                self._wait(tdist.irecv(flat, p), "model part", p)
                unflatten_into(flat, tensors)
        return self.model if self.first else None
