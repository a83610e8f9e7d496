"""What the pipeline strategies share: cutting the model across ranks, point-to-point messages
between neighbouring stages, the per-step exchange of figures, gathering the model for evaluation,
and per-stage accounting.

A model is an ordered list of stages mapping ``(x, lengths)`` to ``(x, lengths)``
(:mod:`asr_parallel.models.base`). A pipeline of S ranks gives each rank a contiguous *part* of that
list: balanced by parameter count or by forward FLOPs (the cut that minimises the heaviest part),
or at explicit boundaries from the config. Rank s runs part s; part 0 reads the features, the
last part computes the CTC loss. Every rank reads the same batches (one data stream), so the
targets and lengths of every minibatch are at hand on the last stage without being sent.

Messages (``pipelined_bp``): speech batches have variable length, so an activation travels as a
fixed-size header (batch, time, feature dims, dtype), then the lengths (int64), then the values; its
gradient travels back with the shape the receiver already knows. Every receive waits at most
``recv_timeout`` seconds, so a stage that died makes its neighbours stop with an error naming it
instead of hanging.

Every call into ``torch.distributed`` is counted in ``comm`` (one call per send, per receive and per
collective, as gloo's sequence number counts them), under the label of its traffic: ``forward``
(activations: sends on the lower stage, receives with 0 bytes sent on the upper), ``backward``
(gradients), ``handshake`` (torch's neighbour greeting of a new pipeline stage), ``control`` (the
all-reduce of the step's figures, :meth:`PipelineStrategy.exchange`, one per clock tick or
minibatch) and ``eval`` (the gather of the model on rank 0, :meth:`PipelineStrategy.eval_model`).
The same calls are predicted from the batch shapes and the cut (:func:`boundary_bytes`) in
``predicted``, so a test can set the two side by side. Bytes per boundary and direction are summed
as they are sent.

Per-stage figures every rank learns at each exchange, kept in the strategy's state (so a resumed run
reports what an uninterrupted one does): busy and idle (waiting on a neighbour) seconds, the largest
weight delay (staleness), updates skipped for a non-finite gradient, and bytes per boundary.
"""
from __future__ import annotations

import datetime
import os
import re
import time

import torch
from torch import nn

from asr_parallel.strategies.base import CommCounter, Strategy

# What a receive or send that failed because the peer or the link did says (gloo's and NCCL's texts).
_LINK_FAILURE = re.compile(r"[Tt]imed? ?out|[Tt]imeout|[Cc]onnection|closed|reset by peer|[Bb]roken pipe|EOF|aborted")

HEADER = 4  # int64 values ahead of every activation: batch, time, feature dims, dtype code
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def p2p_via_host(device: torch.device, group=None) -> bool:
    """Whether point-to-point messages of tensors on ``device`` travel through host copies. Gloo sends
    and receives host memory only: its collectives take CUDA tensors (staged through the host), but
    its send and recv hand the tensor's data pointer to the TCP transport whatever the device (a CUDA
    tensor is not refused, it is read as host memory). So on GPU ranks whose process group is gloo
    (``train.dist_backend: gloo``: several ranks sharing one GPU, which NCCL refuses) an activation or
    gradient is copied to the host to be sent, and received into a host buffer copied to the device.
    ``ASR_PARALLEL_P2P_VIA_HOST=1`` forces the host path (tests on CPU ranks), ``=0`` turns it off."""
    forced = os.environ.get("ASR_PARALLEL_P2P_VIA_HOST", "")
    if forced in ("0", "1"):
        return forced == "1"
    if device.type == "cpu":
        return False
    import torch.distributed as tdist

    return tdist.is_initialized() and tdist.get_backend(group) == "gloo"


class ViaHost:
    """A posted send or receive of a device tensor through a host copy (:func:`p2p_via_host`):
    :meth:`wait` completes the transfer and copies a received host buffer into the device tensor."""

    def __init__(self, work, host: torch.Tensor, target: torch.Tensor | None = None):
        self.work, self.host, self.target = work, host, target

    def wait(self, timeout=None):
        done = self.work.wait() if timeout is None else self.work.wait(timeout=timeout)
        if self.target is not None:
            with torch.no_grad():  # as the backend writes a buffer: not an operation autograd records
                self.target.copy_(self.host)
        return done


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of ``tensor`` to send (a new buffer on CPU ranks too, so that a test that forces the
    host path sends from a copy, as a GPU rank does)."""
    return tensor.detach().to("cpu", copy=True)


def is_send(op) -> bool:
    return getattr(op, "__name__", "") == "isend"


def host_buffer(op, tensor: torch.Tensor) -> torch.Tensor:
    """The host buffer that ``op`` (``isend`` or ``irecv``) moves in place of ``tensor``: a copy of it
    to send, or an empty buffer of its shape to receive into."""
    return host_copy(tensor) if is_send(op) else torch.empty_like(tensor, device="cpu")


def post_p2p(op, tensor: torch.Tensor, peer: int, via_host: bool, **kwargs):
    """``op`` (``isend`` or ``irecv``) of ``tensor`` with ``peer``, through a host buffer when
    ``via_host`` (then the returned work is a :class:`ViaHost`, which keeps the host buffer alive)."""
    if not via_host:
        return op(tensor, peer, **kwargs)
    host = host_buffer(op, tensor)
    return ViaHost(op(host, peer, **kwargs), host, None if is_send(op) else tensor)


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
        self.pipeline_replicas = int(getattr(params, "pipeline_replicas", 1))  # R pipelines (hybrid)
        if dist.world_size % self.pipeline_replicas:
            raise ValueError(f"strategy.pipeline_replicas ({self.pipeline_replicas}) must divide train.world_size "
                             f"({dist.world_size})")
        self.num_parts = dist.world_size // self.pipeline_replicas
        self.part_index = dist.rank % self.num_parts
        self.replica = dist.rank // self.num_parts  # pipeline r holds ranks r S .. r S + S - 1
        self.pipe_group = None  # with R > 1: this pipeline's ranks, and this stage's R replicas
        self.replica_group = None
        self.timeout = datetime.timedelta(seconds=float(params.recv_timeout))
        self.busy = 0.0  # seconds this rank computed (and sent), over the run
        self.idle = 0.0  # seconds this rank waited on a neighbour, over the run
        self.skipped = 0  # updates this part skipped for a non-finite gradient or loss
        self.max_staleness = [0.0] * self.num_parts
        self.figures: dict | None = None  # the last exchange's figures (every stage's)
        self.via_host = False  # point-to-point messages through host copies (p2p_via_host; set in wrap_model)

    # -- data: every rank of a pipeline reads the same batches; R pipelines read R shards
    def data_shard(self) -> tuple[int, int]:
        return self.replica, self.pipeline_replicas

    def global_rank(self, part: int) -> int:
        """The rank that runs ``part`` in this rank's pipeline."""
        return self.replica * self.num_parts + part

    def process_groups(self) -> list:
        return [g for g in (self.pipe_group, self.replica_group) if g is not None]

    @property
    def first(self) -> bool:
        return self.part_index == 0

    @property
    def last(self) -> bool:
        return self.part_index == self.num_parts - 1

    def wrap_model(self, model: nn.Module) -> nn.Module:
        self.model = model
        if self.pipeline_replicas > 1:  # every rank makes every group, in the same order
            import torch.distributed as tdist

            S, R = self.num_parts, self.pipeline_replicas
            for r in range(R):
                group = tdist.new_group([r * S + p for p in range(S)])
                if r == self.replica:
                    self.pipe_group = group
            for p in range(S):
                group = tdist.new_group([r * S + p for r in range(R)])
                if p == self.part_index:
                    self.replica_group = group
        self.starts = model_cut(model, self.num_parts, self.params.balance, list(self.params.boundaries))
        bounds = self.starts + [len(model.stages)]
        self.part = Part(model, bounds[self.part_index], bounds[self.part_index + 1])
        self.bytes_forward = [0] * (self.num_parts - 1)
        self.bytes_backward = [0] * (self.num_parts - 1)
        self.predicted = CommCounter()
        self.via_host = p2p_via_host(self.dist.device, self.pipe_group)
        return self.part

    def prepare_checkpoint(self, ctx) -> list[dict]:
        """Nothing to do for the micro-batch pipelines: no minibatch is in flight between steps
        (``pipelined_bp`` drains its pipeline here)."""
        return []

    def describe(self) -> str:
        names = self.model.stage_names
        bounds = self.starts + [len(names)]
        return "; ".join(f"rank {p}: {', '.join(names[bounds[p]:bounds[p + 1]])}" for p in range(self.num_parts))

    # -- the cost model's prediction of this rank's calls, accumulated per (micro-)batch
    def predict_traffic(self, batch: int, frames: int, times: int = 1, header: bool = True) -> None:
        """The calls of ``times`` (micro-)batches of ``batch`` utterances padded to ``frames``: with
        ``header`` three sends (header, lengths, values) per activation, as ``pipelined_bp`` makes them,
        else one; one per gradient; receives as many, with no bytes sent."""
        per = boundary_bytes(self.model, self.starts, batch, frames, header=header)
        activation_calls = times * (3 if header else 1)
        if not self.last:
            self.predicted.add(times * per[self.part_index]["forward"], activation_calls, "forward")
            self.predicted.add(0, times, "backward")  # receives of the gradient
        if not self.first:
            self.predicted.add(0, activation_calls, "forward")  # receives of the activation
            self.predicted.add(times * per[self.part_index - 1]["backward"], times, "backward")

    def predict_control(self, times: int = 1) -> None:
        """``times`` exchanges of the step's figures (:meth:`exchange`)."""
        for _ in range(times):
            self.predicted.all_reduce(self._exchange_size(), 8, self.num_parts, "control")

    def predicted_comm(self) -> dict:
        p = self.predicted
        return {"bytes_sent": p.bytes_sent, "calls": p.calls, "by_label": p.by_label}

    # -- messages
    def _post(self, op, tensor: torch.Tensor, peer: int, what: str):
        """``isend`` or ``irecv``, with a broken connection reported as :meth:`_wait` does."""
        try:
            return post_p2p(op, tensor, peer, self.via_host)
        except RuntimeError as e:
            self._fail(what, peer, e)

    def _wait(self, work, what: str, peer: int) -> None:
        try:
            work.wait(timeout=self.timeout)
        except RuntimeError as e:
            self._fail(what, peer, e)

    def _fail(self, what: str, peer: int, e: Exception):
        """A timeout or a broken connection is reworded to name the stage it waited for; any other
        error (a wrong device or dtype, a backend that lacks the operation) is re-raised as it is."""
        link = tuple(getattr(torch.distributed, n) for n in ("DistNetworkError", "DistStoreError")
                     if hasattr(torch.distributed, n))
        if not (isinstance(e, link) or _LINK_FAILURE.search(str(e))):
            raise e
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
        self.comm.add(0, 3, "forward")
        self.comm.bytes_received += (HEADER + b) * 8 + x.numel() * x.element_size()
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
        self.comm.add(0, 1, "backward")
        self.comm.bytes_received += grad.numel() * grad.element_size()
        self.idle += time.perf_counter() - t0
        return grad

    def finish_sends(self, pending: list) -> None:
        for item in pending:
            if not torch.is_tensor(item):
                self._wait(item, "acknowledgement of a send", -1)

    # -- figures for the summary and TensorBoard
    def summary_figures(self) -> dict:
        """Per stage: the largest measured staleness (the steady-state delay), the idle fraction and the
        updates skipped for a non-finite gradient; bytes per boundary and direction."""
        f = self.figures or {}
        idle = [i / (b + i) if b + i > 0 else 0.0 for b, i in zip(f.get("busy", []), f.get("idle", []))]
        return {"staleness": list(self.max_staleness), "idle_fraction": idle,
                "skipped_updates": [int(v) for v in f.get("skipped", [0.0] * self.num_parts)],
                "bytes_forward": f.get("bytes_forward"), "bytes_backward": f.get("bytes_backward")}

    def log_scalars(self) -> dict[str, float]:
        f = self.figures
        if not f:
            return {}
        out = {}
        for s in range(self.num_parts):
            total = f["busy"][s] + f["idle"][s]
            out[f"pipeline/busy_seconds_stage{s}"] = f["busy"][s]
            out[f"pipeline/idle_seconds_stage{s}"] = f["idle"][s]
            out[f"pipeline/idle_fraction_stage{s}"] = f["idle"][s] / total if total > 0 else 0.0
            out[f"pipeline/staleness_stage{s}"] = f["staleness"][s]
            out[f"pipeline/skipped_updates_stage{s}"] = f["skipped"][s]
        for b in range(self.num_parts - 1):
            out[f"pipeline/bytes_forward_boundary{b}"] = f["bytes_forward"][b]
            out[f"pipeline/bytes_backward_boundary{b}"] = f["bytes_backward"][b]
        return out

    # -- figures shared by all ranks once per step (one small all-reduce, counted as "control")
    def _exchange_sizes(self) -> dict:
        s = self.num_parts
        return {"loss": 1, "has_loss": 1, "sq_norm": 1, "bad": s, "busy": s, "idle": s, "staleness": s,
                "skipped": s, "bytes_forward": s - 1, "bytes_backward": s - 1}

    def _exchange_size(self) -> int:
        return sum(self._exchange_sizes().values())

    def _exchange_device(self) -> torch.device:
        """Where the exchange's vector lives: the GPU under NCCL (which takes no CPU tensors), else CPU."""
        import torch.distributed as tdist

        if self.num_parts > 1 and tdist.get_backend() == "nccl":
            return next(self.part.parameters(), torch.empty(0, device="cuda")).device
        return torch.device("cpu")

    def exchange(self, mine: dict) -> dict:
        """One all-reduce (sum) of the step's figures: this rank's ``loss`` (last stage) and squared
        gradient norm ``sq_norm``, and its own slot of the per-stage ``bad`` (a bad step originated
        here), ``staleness``, ``busy`` and ``idle`` seconds and ``skipped`` updates (both over the run),
        and the per-boundary ``bytes_forward`` and ``bytes_backward``. Every rank learns them all;
        ``sq_norm`` is the sum over the stages, ``bad`` stays per stage, with ``any_bad`` their OR."""
        import torch.distributed as tdist

        s, me = self.num_parts, self.part_index
        sizes = self._exchange_sizes()
        v = torch.zeros(sum(sizes.values()), dtype=torch.float64)
        offsets, o = {}, 0
        for k, n in sizes.items():
            offsets[k] = o
            o += n
        if mine.get("loss") is not None:
            v[offsets["loss"]], v[offsets["has_loss"]] = float(mine["loss"]), 1.0
        v[offsets["sq_norm"]] = float(mine.get("sq_norm", 0.0))
        v[offsets["bad"] + me] = float(bool(mine.get("bad", False)))
        v[offsets["busy"] + me] = self.busy
        v[offsets["idle"] + me] = self.idle
        v[offsets["staleness"] + me] = float(mine.get("staleness", 0.0))
        v[offsets["skipped"] + me] = float(self.skipped)
        if s > 1:
            v[offsets["bytes_forward"]:offsets["bytes_forward"] + s - 1] += torch.tensor(self.bytes_forward,
                                                                                        dtype=torch.float64)
            v[offsets["bytes_backward"]:offsets["bytes_backward"] + s - 1] += torch.tensor(self.bytes_backward,
                                                                                          dtype=torch.float64)
            v = v.to(self._exchange_device())
            self.comm.all_reduce(v.numel(), v.element_size(), s, "control")
            try:
                work = tdist.all_reduce(v, group=self.pipe_group, async_op=True)
            except RuntimeError as e:
                self._fail("step figures", -1, e)
            self._wait(work, "step figures", -1)
        out = {k: v[offsets[k]:offsets[k] + n].tolist() for k, n in sizes.items()}
        self.max_staleness = [max(a, b) for a, b in zip(self.max_staleness, out["staleness"])]
        for k in ("loss", "has_loss", "sq_norm"):
            out[k] = out[k][0]
        out["loss"] = out["loss"] if out["has_loss"] > 0 else None
        out["bad"] = [b > 0 for b in out["bad"]]
        out["any_bad"] = any(out["bad"])
        self.figures = out
        return out

    @staticmethod
    def step_output(figures: dict, frames: int, cut_ids: list, device=None) -> dict:
        """What ``train_step`` returns to the trainer: a step that finished no minibatch has loss None,
        unless it is bad (then NaN, so that the trainer's bad-batch counter sees it)."""
        loss = figures["loss"]
        if loss is None and figures["any_bad"]:
            loss = float("nan")
        return {"bad": torch.tensor([1.0 if figures["any_bad"] else 0.0]),
                "loss": None if loss is None else torch.tensor(loss),
                "grad_norm": torch.tensor(figures["sq_norm"] ** 0.5), "frames": frames, "cut_ids": cut_ids}

    # -- checkpoints: the figures go on where they were
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["pipeline"] = {
            "predicted": self.predicted.state_dict(), "bytes_forward": list(self.bytes_forward),
            "bytes_backward": list(self.bytes_backward), "max_staleness": list(self.max_staleness),
            "busy": self.busy, "idle": self.idle, "skipped": self.skipped,
            "figures": {k: v for k, v in (self.figures or {}).items()} or None,
        }
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        p = state.get("pipeline")
        if p is None:  # a checkpoint from before the figures were saved
            return
        self.predicted.load_state_dict(p["predicted"])
        self.bytes_forward, self.bytes_backward = list(p["bytes_forward"]), list(p["bytes_backward"])
        self.max_staleness = list(p["max_staleness"])
        self.busy, self.idle, self.skipped = p["busy"], p["idle"], p["skipped"]
        self.figures = dict(p["figures"]) if p["figures"] else None

    # -- evaluation: the whole model on rank 0
    def eval_model(self, model: nn.Module) -> nn.Module | None:
        """Collective: every rank sends its part's parameters and floating-point buffers to rank 0 (one
        send per part, counted and predicted as ``eval``), which returns the whole model (the others
        return None)."""
        import torch.distributed as tdist

        if self.num_parts == 1:
            return self.model if self.replica == 0 else None
        if self.replica != 0:  # the replicas hold the same model: the first pipeline gathers it
            return None
        bounds = self.starts + [len(self.model.stages)]
        for p in range(1, self.num_parts):
            tensors = [t for i in range(bounds[p], bounds[p + 1]) for t in
                       list(self.model.stages[i].parameters()) + [b for b in self.model.stages[i].buffers()
                                                                  if b.is_floating_point()]]
            if not tensors:
                continue
            nbytes = sum(t.numel() for t in tensors) * tensors[0].element_size()
            if self.part_index == p:
                flat = torch.cat([t.detach().reshape(-1).to(tensors[0].dtype) for t in tensors])
                for counter in (self.comm, self.predicted):
                    counter.add(nbytes, 1, "eval")
                tdist.send(host_copy(flat) if self.via_host else flat, 0)
            elif self.first:
                flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
                for counter in (self.comm, self.predicted):
                    counter.add(0, 1, "eval")
                self.comm.bytes_received += nbytes
                self._wait(self._post(tdist.irecv, flat, p, "model part"), "model part", p)
                offset = 0
                for t in tensors:
                    t.data.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()
        return self.model if self.first else None
