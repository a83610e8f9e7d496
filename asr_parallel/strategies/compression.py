"""Gradient compression for synchronous SGD (``sync_sgd``'s ``compression``), inside the counting hook.

Schemes (``strategy.compression``):

* ``none``: the plain all-reduce of :mod:`asr_parallel.strategies.ddp`.
* ``bf16`` / ``fp16``: each bucket, divided by the utterances of all ranks, is rounded to 16 bits,
  summed by an all-reduce in that type and copied back (torch's ``bf16_compress_hook`` /
  ``fp16_compress_hook`` do the same with the mean over ranks): half the bytes.
* ``powersgd`` (Vogels, Karimireddy, Jaggi, "PowerSGD: practical low-rank gradient compression for
  distributed optimization", NeurIPS 2019): torch's ``powerSGD_hook`` (error feedback and warm start
  on): per weight matrix M (n x m) of a bucket P = M Q, all-reduce P, orthogonalise, Q = M^T P,
  all-reduce Q, M ~ P Q^T; vectors and matrices that would not shrink by ``powersgd_min_compression_rate``
  go in one plain all-reduce. Three all-reduces per bucket; at rank r a compressed matrix sends
  2(K-1)/K * 4 r (n + m) bytes instead of 2(K-1)/K * 4 n m.
* ``onebit`` (Seide, Fu, Droppo, Li, Yu, "1-bit stochastic gradient descent and its application to
  data-parallel distributed training of speech DNNs", Interspeech 2014): the carried quantisation
  error is added to the gradient, only the sign of each value is kept, and each column is
  reconstructed from the mean of its positive and the mean of its other values; the difference
  between the input and the reconstruction is carried to the next step (error feedback). Each rank
  aggregates a stripe of columns (the model's columns dealt to the K ranks round robin, whatever
  DDP's buckets): every rank sends stripe k of its quantised bucket to rank k (an all-to-all), rank k decodes and sums the K of them, quantises the sum again with an error buffer
  of its own, and the re-quantised stripes are gathered by every rank (an all-gather). The signs
  travel packed 8 to a byte (uint8), each column with two float32 reconstruction values, so a
  column of n values costs ceil(n / 8) + 8 bytes in place of 4 n.

  A "column" here is a row of PyTorch's (out, in) weight, one output unit's fan-in, contiguous in
  memory; a vector (bias, normalisation) is one column. This departs from the paper: in CNTK's
  column-major (out, in) matrices a column is one input's fan-out.

Common to every compressing scheme: the first ``start_step`` steps use the plain all-reduce (DDP
rebuilds its buckets after the first step; torch's PowerSGD needs two plain steps before warm start
and error feedback), and from then on each step begins with one all-reduce of two values, the
rank's utterance count and a non-finite-loss flag, so that the compressed buckets carry the global
mean of the loss (as the plain path does) and a non-finite loss on any rank makes every rank's
gradients NaN (the step is skipped everywhere). Error buffers are cleared of non-finite values
after every step, and a non-finite PowerSGD warm-start Q is drawn afresh, so that one bad batch
does not poison the steps after it (tested).

Counted: every all-reduce, all-to-all and all-gather with the bytes this rank sends (the all-to-all:
the stripes for the other ranks; the ring all-gather: K - 1 copies of the padded stripe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

SCHEMES = ("none", "bf16", "fp16", "powersgd", "onebit")
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_signs(positive: torch.Tensor) -> torch.Tensor:
    """Booleans packed 8 to a byte (first value in the lowest bit), ceil(n / 8) bytes."""
    n = positive.numel()
    pad = (-n) % 8
    bits = torch.nn.functional.pad(positive.reshape(-1).to(torch.uint8), (0, pad)).view(-1, 8)
    return (bits * _BITS.to(bits.device)).sum(1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of :func:`pack_signs`: ``n`` booleans."""
    bits = packed.unsqueeze(1).bitwise_and(_BITS.to(packed.device)).ne(0)
    return bits.view(-1)[:n]


@dataclass
class Stripe:
    """A contiguous range [start, end) of a bucket holding whole columns: ``group`` gives each value's
    column (0-based within the stripe), ``sizes`` the values per column."""

    start: int
    end: int
    group: torch.Tensor
    sizes: torch.Tensor

    @property
    def columns(self) -> int:
        return self.sizes.numel()


def column_sizes(shapes: list[tuple[int, ...]]) -> list[int]:
    """The columns of a bucket's tensors, in order: a tensor of shape (d0, d1, ...) has d0 columns of
    d1 * ... values; a vector or scalar is one column."""
    sizes: list[int] = []
    for shape in shapes:
        numel = math.prod(shape)
        if len(shape) >= 2 and numel:
            sizes += [numel // shape[0]] * shape[0]
        elif numel:
            sizes.append(numel)
    return sizes


def stripe_of(sizes: list[int], device=None) -> Stripe:
    """One stripe of whole columns of these sizes, in order."""
    group = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long)) \
        if sizes else torch.zeros(0, dtype=torch.long)
    return Stripe(0, sum(sizes), group.to(device), torch.tensor(sizes, dtype=torch.float32, device=device))


def quantize(x: torch.Tensor, stripe: Stripe) -> tuple[torch.Tensor, torch.Tensor]:
    """One-bit quantisation of ``x`` (a stripe's values): (payload, reconstruction). The payload is
    the float32 pairs (mean of the positive values, mean of the others) per column followed by the
    packed signs; the reconstruction gives each value its column's mean of its side."""
    g = stripe.group
    positive = x > 0
    cols = stripe.columns
    x32 = x.float()
    pos_count = torch.zeros(cols, device=x.device).index_add_(0, g, positive.float())
    pos_sum = torch.zeros(cols, device=x.device).index_add_(0, g, torch.where(positive, x32, 0.0))
    all_sum = torch.zeros(cols, device=x.device).index_add_(0, g, x32)
    means = torch.stack([pos_sum / pos_count.clamp(min=1.0),
                         (all_sum - pos_sum) / (stripe.sizes - pos_count).clamp(min=1.0)], 1)  # (cols, 2)
    recon = torch.where(positive, means[g, 0], means[g, 1]).to(x.dtype)
    payload = torch.cat([means.reshape(-1).view(torch.uint8), pack_signs(positive)])
    return payload, recon


def dequantize(payload: torch.Tensor, stripe: Stripe, dtype=torch.float32) -> torch.Tensor:
    """The reconstruction a payload of :func:`quantize` stands for."""
    n, head = stripe.end - stripe.start, 8 * stripe.columns
    means = payload[:head].clone().view(torch.float32).view(-1, 2)  # a copy: aligned for float32
    positive = unpack_signs(payload[head:head + math.ceil(n / 8)], n)
    g = stripe.group
    return torch.where(positive, means[g, 0], means[g, 1]).to(dtype)




def column_owners(shapes: list[tuple[int, ...]], world: int) -> list[torch.Tensor]:
    """For the model's tensors (in ``model.parameters()`` order), the rank that aggregates each column:
    the columns, numbered in that order, are dealt round robin (column j to rank j mod K). Fixed by
    the model, not by DDP's buckets, so that the second quantisation's error stays with its rank when
    DDP rebuilds its buckets (after the first step, and again after every restart); and balanced
    inside every bucket, so that no rank receives more than its share of an all-to-all and the
    all-gather's padding stays small."""
    owners, first = [], 0
    for shape in shapes:
        cols = len(column_sizes([shape]))
        owners.append((first + torch.arange(cols, dtype=torch.long)) % world)
        first += cols
    return owners


@dataclass
class OneBitLayout:
    """A bucket seen by 1-bit SGD: its tensors (model indices, offsets in the bucket), the bucket's
    positions in stripe order (``perm``: the values of rank 0's columns, then rank 1's, ...) and the
    stripes as ranges of that order."""

    params: tuple
    offsets: list[int]
    perm: torch.Tensor
    stripes: list[Stripe]


def onebit_layout(params: tuple, shapes: list, offsets: list[int], owners: list[torch.Tensor], world: int,
                  device) -> OneBitLayout:
    pieces: list[list[torch.Tensor]] = [[] for _ in range(world)]
    widths: list[list[int]] = [[] for _ in range(world)]
    for i, shape, offset in zip(params, shapes, offsets):
        cols = column_sizes([shape])
        if not cols:
            continue
        width = cols[0]
        for k in range(world):
            mine = (owners[i] == k).nonzero().flatten()
            if mine.numel():
                pieces[k].append((offset + mine[:, None] * width + torch.arange(width)).flatten())
                widths[k] += [width] * mine.numel()
    stripes, perm, start = [], [], 0
    for k in range(world):
        stripe = stripe_of(widths[k], device)
        stripe.start, stripe.end = start, start + stripe.end
        stripes.append(stripe)
        perm += pieces[k]
        start = stripe.end
    perm_t = torch.cat(perm) if perm else torch.zeros(0, dtype=torch.long)
    return OneBitLayout(params, offsets, perm_t.to(device), stripes)


@dataclass
class CompressionState:
    """What the compressing hook keeps between steps (per rank). Error and warm-start buffers are kept
    per model tensor (``error``, ``error_sum``: 1-bit SGD's two quantisations; ``psgd_error``,
    ``psgd_q``: PowerSGD's, moved between torch's per-bucket dictionaries and these when DDP's
    buckets change), so that checkpoints do not depend on DDP's bucket layout."""

    scheme: str
    start_step: int
    powersgd_rank: int = 1
    powersgd_min_compression_rate: float = 2.0
    step: int = 0  # steps begun (set_weight calls)
    total: torch.Tensor | None = None  # this step's (utterances, non-finite losses) summed over ranks
    index_of: dict = field(default_factory=dict)  # id(parameter) -> its place in model.parameters()
    param_shapes: list = field(default_factory=list)  # shapes in model.parameters() order
    owners: list | None = None  # 1-bit SGD: per tensor, the rank of each column
    layouts: dict = field(default_factory=dict)  # bucket index -> OneBitLayout
    error: dict = field(default_factory=dict)  # tensor index -> 1-bit error of this rank's gradient
    error_sum: dict = field(default_factory=dict)  # tensor index -> 1-bit error of the sums this rank made
    powersgd: object = None  # torch's PowerSGDState, made at the first compressed step
    psgd_meta: dict = field(default_factory=dict)  # bucket index -> (tensor indices, shapes) of torch's dicts
    psgd_error: dict = field(default_factory=dict)  # tensor index -> PowerSGD error (between layouts)
    psgd_q: dict = field(default_factory=dict)  # tensor index -> PowerSGD warm-start Q (between layouts)
    psgd_iter: int | None = None
    shapes: dict = field(default_factory=dict)  # bucket index -> [(tensor index, shape)], as compressed
    ddp: object = None  # the DDP module, whose bucket rebuild changes the layout
    rebuilt_seen: bool = False

    def begin_step(self) -> None:
        """At a step's start (after its forward pass, where DDP rebuilds its buckets): when the layout
        changed, move PowerSGD's per-bucket buffers to per-tensor form and forget the old layouts."""
        self.step += 1
        rebuilt = bool(getattr(self.ddp, "_has_rebuilt_buckets", False))
        if rebuilt == self.rebuilt_seen:
            return
        self.rebuilt_seen = rebuilt
        if self.powersgd is not None:
            err, q = powersgd_per_tensor(self)
            self.psgd_error.update(err)
            self.psgd_q.update(q)
            for d in (self.powersgd.error_dict, self.powersgd.p_memory_dict, self.powersgd.q_memory_dict):
                d.clear()
            self.psgd_meta.clear()
        self.layouts.clear()
        self.shapes.clear()

    def attach(self, model) -> None:
        params = list(model.parameters())
        self.index_of = {id(p): i for i, p in enumerate(params)}
        self.param_shapes = [tuple(p.shape) for p in params]

    def compressing(self) -> bool:
        return self.scheme != "none" and self.step > self.start_step

    def state_dict(self) -> dict:
        out = {"step": self.step, "error": dict(self.error), "error_sum": dict(self.error_sum)}
        if self.powersgd is not None:
            err, q = powersgd_per_tensor(self)
            out.update(psgd_iter=self.powersgd.iter, psgd_error={**self.psgd_error, **err},
                       psgd_q={**self.psgd_q, **q})
        return out

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.error = dict(state.get("error", {}))
        self.error_sum = dict(state.get("error_sum", {}))
        self.psgd_error = dict(state.get("psgd_error", {}))
        self.psgd_q = dict(state.get("psgd_q", {}))
        self.psgd_iter = state.get("psgd_iter")
        self.layouts, self.psgd_meta, self.powersgd = {}, {}, None


def _compressed_order(params: tuple, shapes: list, rank: int, min_rate: float) -> list:
    """The tensors torch's PowerSGD hook compresses, in the order of its Q memory (grouped by shape,
    shapes in the order first met), each as (tensor index, m, r)."""
    groups: dict = {}
    for i, shape in zip(params, shapes):
        numel = math.prod(shape)
        n = shape[0] if shape else 1
        m = numel // n if n else 0
        r = min(n, m, rank)
        if numel and n * m > (n + m) * r * min_rate:
            groups.setdefault((n, m), []).append((i, m, r))
    return [t for members in groups.values() for t in members]


def powersgd_per_tensor(cs: CompressionState) -> tuple[dict, dict]:
    """torch's per-bucket PowerSGD error and Q memories, split per model tensor."""
    ps, err, q = cs.powersgd, {}, {}
    for index, (params, shapes) in cs.psgd_meta.items():
        if index in ps.error_dict:
            for i, piece in zip(params, ps.error_dict[index].split([math.prod(s) for s in shapes])):
                err[i] = piece.clone()
        if index in ps.q_memory_dict:
            order = _compressed_order(params, shapes, ps.matrix_approximation_rank, ps.min_compression_rate)
            for (i, m, r), piece in zip(order, ps.q_memory_dict[index].split([m * r for _, m, r in order])):
                q[i] = piece.clone()
    return err, q


def _powersgd_bucket(cs: CompressionState, index: int, params: tuple, shapes: list) -> None:
    """Keep torch's per-bucket dictionaries right for this bucket: when it is new to them (the first
    compressed step, a resume, a new layout: :meth:`CompressionState.begin_step`), fill them from the
    per-tensor form."""
    ps = cs.powersgd
    known = cs.psgd_meta.get(index)
    if known is not None:
        if known[0] != params:
            raise RuntimeError(f"PowerSGD: bucket {index} changed its tensors without DDP rebuilding its buckets")
        return
    cs.psgd_meta[index] = (params, shapes)
    if all(i in cs.psgd_error for i in params):
        ps.error_dict[index] = torch.cat([cs.psgd_error[i].reshape(-1) for i in params])
    order = _compressed_order(params, shapes, ps.matrix_approximation_rank, ps.min_compression_rate)
    if order and all(i in cs.psgd_q for i, _, _ in order):
        ps.q_memory_dict[index] = torch.cat([cs.psgd_q[i].reshape(-1) for i, _, _ in order])
        total_p = sum(math.prod(shapes[params.index(i)][:1]) * r for i, _, r in order)
        ps.p_memory_dict[index] = torch.empty(total_p, dtype=ps.q_memory_dict[index].dtype,
                                              device=ps.q_memory_dict[index].device)


def make_powersgd_state(cs: CompressionState, group):
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

    ps = PowerSGDState(process_group=group, matrix_approximation_rank=cs.powersgd_rank,
                       start_powerSGD_iter=max(2, cs.start_step),
                       min_compression_rate=cs.powersgd_min_compression_rate,
                       use_error_feedback=True, warm_start=True, random_seed=0)
    ps.iter = cs.psgd_iter if cs.psgd_iter is not None else cs.step - 1  # the plain steps before this one
    return ps


def powersgd_split(shapes: list[tuple[int, ...]], rank: int, min_rate: float) -> tuple[int, int, int]:
    """What torch's ``powerSGD_hook`` sends for a bucket of tensors of these shapes: (values of the
    plain all-reduce of the tensors it does not compress, values of all P, values of all Q)."""
    order = _compressed_order(tuple(range(len(shapes))), shapes, rank, min_rate)
    compressed = {i for i, _, _ in order}
    plain = sum(math.prod(s) for j, s in enumerate(shapes) if j not in compressed)
    return plain, sum(shapes[i][0] * r for i, _, r in order), sum(m * r for _, m, r in order)


def _clean(t: torch.Tensor) -> None:
    torch.nan_to_num_(t, nan=0.0, posinf=0.0, neginf=0.0)


def _per_tensor(store: dict, layout: OneBitLayout, shapes: list, like: torch.Tensor) -> torch.Tensor:
    """A bucket-shaped copy of per-tensor buffers (zeros where none yet)."""
    flat = torch.zeros_like(like)
    for i, shape, offset in zip(layout.params, shapes, layout.offsets):
        if i in store:
            n = math.prod(shape)
            flat[offset:offset + n] = store[i]
    return flat


def _store(store: dict, layout: OneBitLayout, shapes: list, flat: torch.Tensor) -> None:
    for i, shape, offset in zip(layout.params, shapes, layout.offsets):
        store[i] = flat[offset:offset + math.prod(shape)].clone()


def _done(value: torch.Tensor):
    fut = torch.futures.Future()
    fut.set_result(value)
    return fut


def compressed_hook(hs, bucket):
    """The hook for a compressing step (``hs``: :class:`asr_parallel.strategies.ddp.HookState`).

    PowerSGD and 1-bit SGD make several collectives per bucket, each depending on the one before.
    They run to the end inside the hook, on DDP's thread, one bucket after the other: gloo runs a
    future's callbacks on its own worker threads, where a collective started for one bucket could
    queue in a different order on different ranks than another bucket's (and block a worker). So
    their communication does not overlap the rest of the backward pass; bf16 and fp16 (one
    all-reduce) still do. A step that a non-finite loss on any rank makes bad communicates as any
    other (so that the counts stay those of the cost model) but leaves the error and warm-start
    buffers as they were."""
    import torch.distributed as tdist

    cs: CompressionState = hs.compression
    buf = bucket.buffer()
    total = cs.total
    inv = 1.0 / total[0].clamp(min=1.0)  # the utterances of all ranks
    bad = total[1] > 0
    index = bucket.index()
    grads = bucket.gradients()
    shapes = [tuple(g.shape) for g in grads]
    params = tuple(cs.index_of[id(p)] for p in bucket.parameters())
    cs.shapes[index] = [[i, list(s)] for i, s in zip(params, shapes)]

    def finish(result: torch.Tensor) -> torch.Tensor:
        if result.data_ptr() != buf.data_ptr():
            buf.copy_(result)
        buf.masked_fill_(bad, float("nan"))  # a tensor condition: no wait for the device
        return buf

    if cs.scheme in ("bf16", "fp16"):
        dtype = torch.bfloat16 if cs.scheme == "bf16" else torch.float16
        half = (buf * inv).to(dtype)
        hs.comm.all_reduce(half.numel(), half.element_size(), hs.world, hs.label)
        fut = tdist.all_reduce(half, group=hs.group, async_op=True).get_future()
        return fut.then(lambda f: finish(f.value()[0]))

    skip = bool(bad)  # the buffers stay as they were (a host read: these schemes wait anyway)
    if cs.scheme == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import powerSGD_hook

        if cs.powersgd is None:
            cs.powersgd = make_powersgd_state(cs, hs.group)
        ps = cs.powersgd
        _powersgd_bucket(cs, index, params, shapes)
        saved = {name: d[index].clone() for name, d in (("error", ps.error_dict), ("p", ps.p_memory_dict),
                                                         ("q", ps.q_memory_dict)) if index in d} if skip else None
        buf.mul_(inv * hs.world)  # torch's hook takes the mean over ranks: the global mean of the loss
        # compressing steps come after start_step >= start_powerSGD_iter plain ones: torch compresses
        for numel in powersgd_split(shapes, ps.matrix_approximation_rank, ps.min_compression_rate):
            hs.comm.all_reduce(numel, buf.element_size(), hs.world, hs.label)
        result = powerSGD_hook(ps, bucket).wait()
        if saved is not None:
            for name, d in (("error", ps.error_dict), ("p", ps.p_memory_dict), ("q", ps.q_memory_dict)):
                if name in saved:
                    d[index] = saved[name]
                else:
                    d.pop(index, None)
        else:
            if index in ps.error_dict:
                _clean(ps.error_dict[index])
            q = ps.q_memory_dict.get(index)
            if q is not None and not bool(torch.isfinite(q).all()):  # draw Q afresh next step
                del ps.q_memory_dict[index], ps.p_memory_dict[index]
        return _done(finish(result))

    # onebit
    k, me = hs.world, tdist.get_rank(hs.group)
    if cs.owners is None:
        cs.owners = column_owners(cs.param_shapes, k)
    layout = cs.layouts.get(index)
    if layout is None or layout.params != params:
        offsets = [(g.data_ptr() - buf.data_ptr()) // buf.element_size() for g in grads]
        layout = cs.layouts[index] = onebit_layout(params, shapes, offsets, cs.owners, k, buf.device)
    perm, stripes, mine = layout.perm, layout.stripes, layout.stripes[me]
    x = buf * inv + _per_tensor(cs.error, layout, shapes, buf)
    xp = x[perm]
    payloads, recon = [], torch.empty_like(xp)
    for s in stripes:
        payload, r = quantize(xp[s.start:s.end], s)
        payloads.append(payload)
        recon[s.start:s.end] = r
    if not skip:
        error = torch.empty_like(x)
        error[perm] = xp - recon
        _clean(error)
        _store(cs.error, layout, shapes, error)
    # stripe k of every rank's quantised bucket to rank k (an all-to-all of packed bytes)
    sizes = [p.numel() for p in payloads]  # bytes (uint8)
    size = sizes[me]  # what every rank sends this one: its stripe, laid out alike on every rank
    out = torch.empty(k * size, dtype=torch.uint8, device=buf.device)
    hs.comm.add(sum(b for j, b in enumerate(sizes) if j != me), 1, hs.label)
    hs.comm.bytes_received += (k - 1) * size
    tdist.all_to_all_single(out, torch.cat(payloads), [size] * k, sizes, group=hs.group)
    # this rank's stripe: the sum of the K decoded stripes, quantised again with its own error
    parts = out.view(k, size)
    summed = sum(dequantize(parts[j], mine, buf.dtype) for j in range(k))
    where = perm[mine.start:mine.end]
    error_sum = _per_tensor(cs.error_sum, layout, shapes, buf)
    y = summed + error_sum[where]
    payload, r = quantize(y, mine)
    if not skip:
        error_sum[where] = y - r
        _clean(error_sum)
        _store(cs.error_sum, layout, shapes, error_sum)
    # every rank's re-quantised stripe to every rank (a ring all-gather, padded to the largest)
    width = max(sizes)
    padded = torch.zeros(width, dtype=torch.uint8, device=buf.device)
    padded[:payload.numel()] = payload
    hs.comm.add((k - 1) * padded.numel(), 1, hs.label)  # a ring: K - 1 stripes forwarded
    hs.comm.bytes_received += (k - 1) * width
    gathered = [torch.empty(width, dtype=torch.uint8, device=buf.device) for _ in range(k)]
    tdist.all_gather(gathered, padded, group=hs.group)
    result = torch.empty_like(xp)
    for s, p in zip(stripes, gathered):
        result[s.start:s.end] = dequantize(p, s, buf.dtype)
    buf[perm] = result
    return _done(finish(buf))
