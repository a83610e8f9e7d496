"""Predict step time and speed-up per strategy for K = 1 ... 64 workers (asr_parallel.scaling).

Measures the recipe model's forward and backward time per frame on this machine (a few steps on
synthetic batches of the recipe's batch size; or give them with --forward-us/--backward-us, e.g.
from a GPU), takes the model's parameter count and the activation width at a two-part pipeline cut,
and a cluster description from the options; prints a table, writes JSON and a PNG of speed-up against
workers under exp_dir/scaling/.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import torch

from asr_parallel.config import add_config_args, load_config
from asr_parallel.utils.io import atomic_write_json

STRATEGIES = [{"name": "sync_sgd"}, {"name": "model_averaging", "sync_period": 50},
              {"name": "bmuf", "sync_period": 50}, {"name": "hierarchical", "sync_period": 50},
              {"name": "pipelined_bp"}, {"name": "gpipe", "microbatches": 4}]


def measure(cfg, steps: int = 3, batches: list | None = None) -> tuple[float, float, float]:
    """(forward, backward) seconds per input frame of the recipe's model, on CPU here, and seconds of
    its update per step (gradient clipping and the configured optimiser's step). Timed on ``batches``
    ((features, lengths, tokens) each; the first only warms up), by default ``steps`` + 1 synthetic
    batches of the recipe's size; per frame means per real (unpadded) frame."""
    batches = batches or [synthetic_batch(cfg)] * (steps + 1)
    fwd, bwd, upd, _ = measure_ranks(cfg, [batches])
    return fwd, bwd, upd


def measure_ranks(cfg, per_rank: list[list], concurrent: bool = False, threads: int | None = None,
                  launches: int = 3) -> tuple[float, float, float, list[list[float]]]:
    """:func:`measure` for the batches of several ranks (``per_rank[r]``: rank r's batches, the same
    count for each, the first only warming up), each rank with a model and optimiser of its own.
    Returns the per-frame forward and backward seconds and the update seconds over all ranks, and each
    rank's seconds per step (forward, loss, backward and update) after the first.

    In one process (``concurrent`` False) the ranks' batches of one step are timed one after the other,
    in turns that alternate which rank goes first, so that a drift of the machine's speed falls on all
    ranks alike. With ``concurrent`` every rank is a fresh process of its own (``threads`` threads,
    by default this process's count), as in a run, and all of them work at once, step by step, each
    step begun together (:func:`measure_concurrently`): what they take from each other (cores, memory
    bandwidth, caches) and a fresh process's memory state are in the timings, as they are in a run.
    A process's pace differs from launch to launch (by some percent here: where its memory lies,
    which core it starts on), so the processes are launched ``launches`` times and the timings of all
    launches taken together."""
    n_steps = min(len(b) for b in per_rank)
    if concurrent:
        records = [[] for _ in per_rank]  # (batch, forward, backward, update) per rank, all launches
        for _ in range(launches):
            got = measure_concurrently(cfg, [{"kind": "rank", "batches": b[:n_steps]} for b in per_rank], threads)
            for mine, rank in zip(records, got):
                mine += [r for r in rank if r[0] > 0]
    else:
        from asr_parallel.models import build_model
        from asr_parallel.train.trainer import make_optimizer

        models = [build_model(cfg.model, cfg.features.num_mel_bins, cfg.tokenizer.vocab_size) for _ in per_rank]
        optimizers = [make_optimizer(cfg.train, m.parameters()) for m in models]
        records = [[] for _ in per_rank]
        for i in range(n_steps):
            order = range(len(per_rank)) if i % 2 == 0 else reversed(range(len(per_rank)))
            for r in order:
                took = _rank_step(models[r], optimizers[r], per_rank[r][i], cfg.train.grad_clip)
                if i:  # the first step warms up
                    records[r].append((i,) + took)
    fwd = sum(x[1] for rank in records for x in rank)
    bwd = sum(x[2] for rank in records for x in rank)
    upd = sum(x[3] for rank in records for x in rank)
    times = [[x[1] + x[2] + x[3] for x in rank] for rank in records]
    n = sum(int(b[i][1].sum()) for b in per_rank for i in range(1, n_steps)) * (launches if concurrent else 1)
    timed = len(per_rank) * (n_steps - 1) * (launches if concurrent else 1)
    return fwd / n, bwd / n, upd / timed, times


def _rank_step(model, optimizer, batch, clip: float) -> tuple[float, float, float]:
    """One training step of the whole model on ``batch`` (features, lengths, tokens): seconds of the
    forward pass with the CTC loss, of the backward pass and of the update."""
    from asr_parallel.train.loss import ctc_loss

    feats, lens, tokens = batch
    t0 = time.perf_counter()
    logits, out_lens = model(feats, lens)
    loss = ctc_loss(logits, out_lens, tokens)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    t3 = _update(model, optimizer, clip)
    return t1 - t0, t2 - t1, t3 - t2


def _part_step(module, optimizer, x, lengths, tokens, first: bool, last: bool, clip: float):
    """The work one pipelined-BP clock tick gives a part, on one batch (``x``: its input): parts
    before the last, a forward pass without a graph, the forward pass again with one and the backward
    pass from an output gradient; the last, the forward pass, the CTC loss and the backward pass. Then
    its update. Returns the seconds of the work and of the update, and the part's output (detached)
    with its lengths."""
    from asr_parallel.train.loss import ctc_loss

    x_in = x.detach().requires_grad_(not first)
    t0 = time.perf_counter()
    if not last:
        with torch.no_grad():
            module(x_in, lengths)
        y, out_lens = module(x_in, lengths)
        y.backward(torch.ones_like(y) / y.numel())
    else:
        y, out_lens = module(x_in, lengths)
        ctc_loss(y, out_lens, tokens).backward()
    t1 = time.perf_counter()
    t2 = _update(module, optimizer, clip)
    return t1 - t0, t2 - t1, y.detach(), out_lens


def _build_parts(cfg, parts: int, balance: str, boundaries: list[int] | None):
    """The recipe's model cut into ``parts`` as ``pipelined_bp`` cuts it: a module per part."""
    from asr_parallel.models import build_model
    from asr_parallel.strategies.pipeline import Part, model_cut

    model = build_model(cfg.model, cfg.features.num_mel_bins, cfg.tokenizer.vocab_size)
    starts = model_cut(model, parts, balance, boundaries) + [len(model.stages)]
    return [Part(model, a, b) for a, b in zip(starts, starts[1:])]


def _concurrent_worker(index: int, cfg, job: dict, threads: int, barrier, queue, timeout: float) -> None:
    """One process of :func:`measure_concurrently`: builds its model (or its part of the model, and
    that part's inputs, untimed), then does its work of every step when all processes have begun it,
    and puts (index, records, error) on ``queue``. A wait for the others longer than ``timeout``
    seconds is an error."""
    import traceback

    try:
        torch.set_num_threads(threads)
        torch.manual_seed(cfg.train.seed)
        if job["kind"] == "rank":
            from asr_parallel.models import build_model
            from asr_parallel.train.trainer import make_optimizer

            module = build_model(cfg.model, cfg.features.num_mel_bins, cfg.tokenizer.vocab_size)
            optimizer = make_optimizer(cfg.train, module.parameters())
            records = []
            barrier.wait(timeout)
            for i, batch in enumerate(job["batches"]):
                records.append((i,) + _rank_step(module, optimizer, batch, cfg.train.grad_clip))
                barrier.wait(timeout)
        else:
            records = _bare_pipeline(cfg, job, index, barrier, timeout)
        queue.put((index, records, None))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        barrier.abort()
        queue.put((index, None, traceback.format_exc()))


def _bare_pipeline(cfg, job: dict, s: int, barrier, timeout: float) -> list:
    """Part ``s`` of a plain pipelined-BP loop: torch and torch.distributed calls, none of the
    strategy's training code (the model is cut as the strategy cuts it, with
    ``strategies/pipeline.model_cut`` and its ``Part`` slice of the model's stages). The schedule and
    wire protocol of ``strategies/pipelined_bp.py`` (Chen et al. 2012): part s in tick t runs the
    forward pass of batch t - s (without a graph; part 0 reads it, the others receive it from s - 1
    as three messages, a header of the shape, the lengths and the activation) and sends it on the
    same way, then the backward pass of batch t - 2(S-1) + s (the output gradient received from
    s + 1, the forward pass recomputed; the last part: the batch whose forward pass it just ran,
    through the CTC loss) and sends the input gradient back; waits for the previous tick's sends;
    joins an all-reduce of the tick's few figures over the parts; and updates. Left out: SpecAugment
    on part 0, the recompute's saving and restoring of the random state, the finiteness checks, and
    the fill and drain ticks at epoch ends and checkpoints (the predictor counts those ticks).
    Returns, per tick, (tick, forward batch, backward batch, seconds of work, of the update, of the
    whole tick, the clock (``time.perf_counter``, one clock for all processes here) at its start,
    the mean frames of the batches it worked on, the messages it sent)."""
    from datetime import timedelta

    import torch.distributed as dist

    from asr_parallel.scaling import exchange_values
    from asr_parallel.train.loss import ctc_loss
    from asr_parallel.train.trainer import make_optimizer

    S = job["parts"]
    modules = _build_parts(cfg, S, job["balance"], job["boundaries"])
    module, first, last = modules[s], s == 0, s == S - 1
    optimizer = make_optimizer(cfg.train, module.parameters())
    inputs, out_shapes = [], []  # this part's input of every batch (what the parts before it make), untimed
    with torch.no_grad():
        for feats, lens, tokens in job["batches"]:
            for m in modules[:s]:
                feats, lens = m(feats, lens)
            inputs.append((feats, lens, tokens))
            out_shapes.append(tuple(module(feats, lens)[0].shape) if not last else None)
    frames = [int(b[1].sum()) for b in job["batches"]]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{job['port']}", rank=s, world_size=S,
                            timeout=timedelta(seconds=timeout))
    try:
        n, records, previous, held = len(inputs), [], [], {}
        figures = torch.zeros(exchange_values(S), dtype=torch.float64)
        barrier.wait(timeout)
        for t in range(n + 2 * (S - 1)):
            t0 = time.perf_counter()
            n_f, n_b, sends, loss = t - s, t - 2 * (S - 1) + s, [], None
            if 0 <= n_f < n:
                x, lens, tokens = inputs[n_f]
                if not first:  # header (shape), lengths, activation: three messages, as the strategy sends
                    header = torch.empty(4, dtype=torch.int64)
                    dist.recv(header, s - 1)
                    lens = torch.empty(int(header[0]), dtype=torch.int64)
                    dist.recv(lens, s - 1)
                    x = torch.empty(tuple(int(v) for v in header[:3]))
                    dist.recv(x, s - 1)
                if last:
                    x_in = x.requires_grad_(not first)
                    logits, out_lens = module(x_in, lens)
                    loss = ctc_loss(logits, out_lens, tokens)
                    held[n_f] = (x_in, lens)
                else:
                    with torch.no_grad():
                        y, y_lens = module(x, lens)
                    y = y.contiguous()
                    for msg in (torch.tensor(list(y.shape) + [0], dtype=torch.int64), y_lens.to(torch.int64), y):
                        sends.append((dist.isend(msg, s + 1), msg))
                    held[n_f] = (x, lens)
            work_end = update_s = 0.0
            if 0 <= n_b < n:
                x_in, lens = held.pop(n_b)
                if last:
                    loss.backward()
                else:
                    grad = torch.empty(out_shapes[n_b])
                    dist.recv(grad, s + 1)
                    x_in = x_in.detach().requires_grad_(not first)
                    y, _ = module(x_in, lens)
                    y.backward(grad)
                if not first:
                    grad_in = x_in.grad.contiguous()
                    sends.append((dist.isend(grad_in, s - 1), grad_in))
                work_end = time.perf_counter()
            for work, _ in previous:
                work.wait()
            previous = sends
            dist.all_reduce(figures)
            if work_end:
                u0 = time.perf_counter()
                update_s = _update(module, optimizer, cfg.train.grad_clip) - u0
            t1 = time.perf_counter()
            touched = [frames[i] for i in {t - p for p in range(S)} | {t - 2 * (S - 1) + p for p in range(S)}
                       if 0 <= i < n]
            records.append((t, n_f if 0 <= n_f < n else None, n_b if 0 <= n_b < n else None,
                            (work_end or t1) - t0, update_s, t1 - t0, t0,
                            sum(touched) / len(touched) if touched else 0.0, len(sends)))
        for work, _ in previous:
            work.wait()
    finally:
        dist.destroy_process_group()
    return records


def measure_concurrently(cfg, jobs: list[dict], threads: int | None = None, timeout: float = 600.0) -> list[list]:
    """Runs every job in a fresh process of its own (spawned, ``threads`` threads each), all at once,
    in steps that begin together (a barrier between steps, as ranks that wait for each other have):
    ``{"kind": "rank", "batches": [...]}`` trains the whole model on its batches, one a step;
    ``{"kind": "pipeline", "parts": S, "balance": ..., "boundaries": ..., "batches": [...], "port": p}``
    (one job per part, job s being part s) runs a plain pipelined-BP loop over gloo
    (:func:`_bare_pipeline`). Returns each job's records: for ranks, (batch index, forward, backward,
    update seconds) per batch, the first a warm-up; for pipeline parts, :func:`_bare_pipeline`'s.
    Plain torch, torch.distributed and multiprocessing around the runs' own model, CTC loss and
    optimiser; none of the trainer's or the strategies' machinery. A
    process that fails, dies or waits for the others longer than ``timeout`` seconds ends the
    measurement with an error naming it; the others are stopped."""
    import queue as queue_module

    import torch.multiprocessing as mp

    threads = threads or torch.get_num_threads()
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(len(jobs)), ctx.Queue()
    procs = [ctx.Process(target=_concurrent_worker, args=(i, cfg, job, threads, barrier, queue, timeout),
                         daemon=True) for i, job in enumerate(jobs)]
    for p in procs:
        p.start()
    got: dict = {}
    errors = []
    try:
        while len(got) < len(procs):
            try:
                index, records, error = queue.get(timeout=1.0)
            except queue_module.Empty:
                dead = [i for i, p in enumerate(procs) if i not in got and p.exitcode is not None]
                if dead:  # died without a word (killed, out of memory): no other process can go on
                    errors += [f"measuring process {i}: died (exit code {procs[i].exitcode})" for i in dead]
                    break
                continue
            if error:
                errors.append(f"measuring process {index}: {error}")
            got[index] = records
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("concurrent measurement failed:\n" + "\n".join(errors))
    return [got[i] for i in range(len(jobs))]


def _update(module, optimizer, clip: float) -> float:
    """The update as the trainer makes it (gradient clipping by the global norm, the optimiser's step,
    gradients cleared); returns the clock after it."""
    torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter()


def lockstep_factor(step_seconds: list[list[float]]) -> float:
    """How much longer a synchronous step is than a rank's mean step: ``step_seconds[r][i]`` is rank
    r's measured time for its batch of sampled step i; ranks that wait for each other every step
    (synchronous SGD) take the slowest rank's time, mean over i of max over r, against the mean over
    all. 1 for one rank."""
    ranks = [s for s in step_seconds if s]
    if len(ranks) < 2:
        return 1.0
    n = min(map(len, ranks))
    slowest = sum(max(s[i] for s in ranks) for i in range(n)) / n
    return slowest / (sum(sum(s[:n]) for s in ranks) / (n * len(ranks)))


def pipeline_lockstep(part_seconds: list[list[float]]) -> float:
    """How much longer pipelined BP's clock tick is than its slowest part's mean: in tick t part s
    works on batch t - s, and the tick lasts as long as the slowest part's work in it; from
    ``part_seconds[s][i]``, part s's measured seconds on batch i, the mean over ticks of that maximum
    against the largest of the parts' means. 1 for one part."""
    if len(part_seconds) < 2:
        return 1.0
    n, s_count = min(map(len, part_seconds)), len(part_seconds)
    ticks = [max(part_seconds[s][t - s] for s in range(s_count)) for t in range(s_count - 1, n)]
    if not ticks:
        return 1.0
    return (sum(ticks) / len(ticks)) / max(sum(p[:n]) / n for p in part_seconds)


def synthetic_batch(cfg, frames: int = 800):
    """A batch of the recipe's size (``train.max_duration`` seconds) of ``frames``-frame random
    utterances with 20-token targets: features, lengths, tokens."""
    utts = max(1, int(cfg.train.max_duration * 100 // frames))
    feats = torch.randn(utts, frames, cfg.features.num_mel_bins)
    lens = torch.full((utts,), frames)
    tokens = [[1 + i % (cfg.tokenizer.vocab_size - 1) for i in range(20)]] * utts
    return feats, lens, tokens


def recipe_batches(cfg, count: int = 9, world_size: int = 1, rank: int = 0, spread: bool = False,
                   within: int | None = None) -> tuple[list, float] | None:
    """The recipe's own training batches of epoch 0 as ``rank`` of ``world_size`` draws them (the
    features of stage 2, the BPE targets of stage 3, the sampler and batch size of training): real
    utterance lengths, padding and batch sizes, which synthetic batches of equal lengths do not have;
    and the mean seconds the training data path took to make one (reading and decompressing the
    features, collating: the trainer's loader does this on the training thread, ``train.num_workers``
    0). The first ``count`` batches, or with ``spread`` ``count`` batches at steps spread evenly over
    the epoch, or over its first ``within`` steps (the first step, then evenly to the last): the same
    step indices for every rank of a world size, so the ranks' batches of one step can be set side by
    side. None when the data stages have not run."""
    import sentencepiece as spm
    from lhotse import load_manifest

    from asr_parallel.tokenizer import lang_dir_name
    from asr_parallel.train.data import CutDataset

    data = Path(cfg.data_dir)
    cuts_path, bpe = data / "fbank/chime6-ihm_cuts_train.jsonl.gz", data / lang_dir_name(cfg.tokenizer) / "bpe.model"
    if not cuts_path.is_file() or not bpe.is_file():
        return None
    dataset = CutDataset(spm.SentencePieceProcessor(model_file=str(bpe)), cfg.train.pad_growth)
    cuts = load_manifest(cuts_path)
    if spread:  # every rank's epoch has the same number of steps; the shortest decides
        n = epoch_steps(cfg, world_size, cuts)
        n = min(n, within) if within else n
        picks = sorted({round(i * (n - 1) / max(1, count - 1)) for i in range(count)}) if n else []
    else:
        picks = list(range(count))
    out, seconds = [], 0.0
    for i, batch_cuts in enumerate(_epoch_sampler(cfg, cuts, rank, world_size)):
        if i not in picks:
            continue
        t0 = time.perf_counter()
        b = dataset[batch_cuts]
        seconds += time.perf_counter() - t0
        out.append((b.feats, b.feat_lens, b.tokens))
        if len(out) == len(picks):
            break
    return out, seconds / max(1, len(out))


def _epoch_sampler(cfg, cuts, rank: int, world_size: int):
    """Epoch 0 of the trainer's sampler for ``rank`` of ``world_size``."""
    from asr_parallel.train.data import make_sampler

    sampler = make_sampler(cuts, cfg.train.max_duration, cfg.train.num_buckets, True, rank, world_size,
                           cfg.train.seed)
    sampler.set_epoch(0)
    return sampler


def epoch_steps(cfg, world_size: int = 1, cuts=None) -> int | None:
    """Steps of one epoch of ``world_size`` ranks (each rank's batches; the shortest rank's count), as
    the trainer's sampler draws them (over ``cuts``, by default the prepared training cuts); None
    without prepared data."""
    if cuts is None:
        from lhotse import load_manifest

        cuts_path = Path(cfg.data_dir) / "fbank/chime6-ihm_cuts_train.jsonl.gz"
        if not cuts_path.is_file():
            return None
        cuts = load_manifest(cuts_path)
    return min(sum(1 for _ in _epoch_sampler(cfg, cuts, r, world_size)) for r in range(world_size))


def step_batches(cfg, world_size: int, count: int = 16, within: int | None = None
                 ) -> tuple[list[list], float] | None:
    """For each rank of ``world_size``, its batches at ``count`` steps spread over epoch 0 or its first
    ``within`` steps (fewer batches when there are fewer steps), the first of them once more in front
    to warm up a measurement, and the mean seconds to make one: the input of :func:`measure_ranks`.
    None without prepared data."""
    per_rank, loads = [], []
    for r in range(world_size):
        got = recipe_batches(cfg, count, world_size, r, spread=True, within=within)
        if got is None or not got[0]:
            return None
        per_rank.append(got[0][:1] + got[0])
        loads.append(got[1])
    return per_rank, sum(loads) / len(loads)


def measure_parts(cfg, parts: int, balance: str = "flops", boundaries: list[int] | None = None,
                  steps: int = 3, batches: list | None = None, per_batch: list | None = None
                  ) -> tuple[list[float], list[float]]:
    """Per part of the model cut as ``pipelined_bp`` cuts it into ``parts``: seconds per input frame of
    the work one clock tick gives that part (:func:`_part_step`: parts before the last, a forward pass
    without a graph, the forward pass again with one, and the backward pass from the output gradient;
    the last, the forward pass, the CTC loss and the backward pass), and seconds of the part's update
    (clipping and optimiser step of its parameters). Timed on the batches of :func:`measure`, the parts
    one after the other in this process. ``per_batch``, a list, receives for every part the seconds
    (work and update) it took on each batch after the first."""
    from asr_parallel.train.trainer import make_optimizer

    modules = _build_parts(cfg, parts, balance, boundaries)  # refuses a cut the model does not have
    batches = batches or [synthetic_batch(cfg)] * (steps + 1)
    optimizers = [make_optimizer(cfg.train, m.parameters()) for m in modules]
    records: list[list] = [[] for _ in range(parts)]
    for i, (feats, lens, tokens) in enumerate(batches):
        x, lengths = feats, lens
        for s, (m, opt) in enumerate(zip(modules, optimizers)):
            work, update, x, lengths = _part_step(m, opt, x, lengths, tokens, s == 0, s == parts - 1,
                                                  cfg.train.grad_clip)
            if i:  # the first step warms up
                records[s].append((work, update))
    if per_batch is not None:
        per_batch[:] = [[w + u for w, u in part] for part in records]
    n = sum(int(lens.sum()) for _, lens, _ in batches[1:])
    return [sum(w for w, _ in part) / n for part in records], \
        [sum(u for _, u in part) / (len(batches) - 1) for part in records]


def measure_pipeline(cfg, parts: int, balance: str = "flops", boundaries: list[int] | None = None,
                     batches: list | None = None, threads: int | None = None, launches: int = 3) -> dict:
    """A plain pipelined-BP loop (:func:`_bare_pipeline`) over ``batches`` (the first warms up) with
    each part a fresh process of its own, all at once, on gloo between them, as the run's ranks are:
    what the parts take from each other on a shared machine, the waits of the ticks' lock-step, the
    sends and receives between the parts and the per-tick exchange as this machine does them.
    Returns ``tick_s``, the mean seconds of a tick in which every part worked on a batch after the
    first (none filling or draining the pipeline), ``frames_per_tick``, the mean over those ticks of
    the mean frames of the batches each worked on, and per part ``work_s_per_frame`` and
    ``update_s`` over those ticks, and ``ticks``, how many, over ``launches`` launches of the
    processes (a process's pace differs from launch to launch, as in :func:`measure_ranks`)."""
    _build_parts(cfg, parts, balance, boundaries)  # refuses a cut the model does not have
    batches = batches or [synthetic_batch(cfg)] * 4
    steady = range(2 * (parts - 1) + 1, len(batches))  # ticks with every part busy, batch 0 left out
    if not steady:
        raise ValueError(f"measure_pipeline: {len(batches)} batches fill and drain {parts} parts without a "
                         "tick in which all of them work; give more batches")
    ticks: list[list] = [[] for _ in range(parts)]
    for _ in range(launches):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        jobs = [{"kind": "pipeline", "parts": parts, "balance": balance, "boundaries": boundaries,
                 "batches": batches, "port": port} for _ in range(parts)]
        for mine, part in zip(ticks, measure_concurrently(cfg, jobs, threads)):
            mine += [r for r in part if r[0] in steady]
    frames = sum(r[7] for r in ticks[0])  # per tick, the mean frames of the batches worked on in it
    return {"tick_s": sum(r[5] for r in ticks[0]) / len(ticks[0]), "frames_per_tick": frames / len(ticks[0]),
            "work_s_per_frame": [sum(r[3] for r in part) / frames for part in ticks],
            "update_s": [sum(r[4] for r in part) / len(part) for part in ticks], "ticks": len(ticks[0])}


def workload(cfg, forward_s: float, backward_s: float, frames_per_step: float, update_s: float = 0.0):
    """The recipe model's :class:`~asr_parallel.scaling.Workload`: its parameter count, the activation
    width at a two-part pipeline cut, and the given compute times per frame and frames per step."""
    from asr_parallel.models import build_model
    from asr_parallel.scaling import Workload
    from asr_parallel.strategies.pipeline import boundary_shapes, model_cut

    model = build_model(cfg.model, cfg.features.num_mel_bins, cfg.tokenizer.vocab_size)
    ((_, t, d),) = boundary_shapes(model, model_cut(model, 2), 1, 1000)
    return Workload(params=model.num_params(), frames_per_step=frames_per_step, forward_s_per_frame=forward_s,
                    backward_s_per_frame=backward_s, activation_values_per_frame=t * d / 1000,
                    max_stages=len(model.stages), update_s=update_s)


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--forward-us", type=float, default=0.0, help="forward time per frame (us); 0: measure")
    p.add_argument("--backward-us", type=float, default=0.0, help="backward time per frame (us); 0: measure")
    p.add_argument("--update-ms", type=float, default=0.0, help="update time per step (ms), with --forward-us")
    p.add_argument("--workers-per-node", type=int, default=8)
    p.add_argument("--intra-gbps", type=float, default=100.0)
    p.add_argument("--inter-gbps", type=float, default=10.0)
    p.add_argument("--latency-us", type=float, default=0.0)
    p.add_argument("--overlap", action="store_true", help="sync_sgd overlaps its all-reduce with backward")
    p.add_argument("--out", default="", help="output directory (default exp_dir/scaling)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from asr_parallel.scaling import Cluster, predict

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.forward_us:
        fwd, bwd, upd = args.forward_us * 1e-6, args.backward_us * 1e-6, args.update_ms * 1e-3
    else:
        fwd, bwd, upd = measure(cfg)
    work = workload(cfg, fwd, bwd, cfg.train.max_duration * 100, upd)
    cluster = Cluster(workers_per_node=args.workers_per_node, nodes=64, intra_gbps=args.intra_gbps,
                      inter_gbps=args.inter_gbps, latency_us=args.latency_us)
    ks = [1, 2, 4, 8, 16, 32, 64]
    rows = predict(STRATEGIES, ks, cluster, work, args.overlap)
    print(f"model {cfg.model.name}: {work.params:,} parameters; {fwd * 1e6:.2f} + {bwd * 1e6:.2f} us per frame "
          f"(forward + backward), {upd * 1e3:.1f} ms per update; {work.frames_per_step:.0f} frames per worker step; {args.workers_per_node} "
          f"workers per node, {args.intra_gbps:g} / {args.inter_gbps:g} Gbit/s inside / between nodes")
    print("| strategy | " + " | ".join(f"K={k}" for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    for s in STRATEGIES:
        got = {r["workers"]: r["speedup"] for r in rows if r["strategy"] == s["name"]}
        cells = [f"{got[k]:.2f}x" if k in got else "-" for k in ks]
        print(f"| {s['name']} | " + " | ".join(cells) + " |")
    out = Path(args.out or Path(cfg.exp_dir) / "scaling")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "scaling.json", {"workload": vars(work), "cluster": vars(cluster), "rows": rows})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for s in STRATEGIES:
        pts = [(r["workers"], r["speedup"]) for r in rows if r["strategy"] == s["name"]]
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", markersize=3, label=s["name"])
    ax.plot(ks, ks, color="grey", linestyle=":", label="linear")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("workers K")
    ax.set_ylabel("predicted speed-up over one worker")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "speedup.png")
    print(f"written: {out}/scaling.json, speedup.png")


if __name__ == "__main__":
    main()
