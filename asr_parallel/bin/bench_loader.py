"""Benchmark: can the data loader keep a rank's training step fed? Measured in one run:

* **loader throughput** (frames/s of batches delivered), the recipe's own path: rank 0's shard of the
  training cuts through the bucketing sampler, :class:`CutDataset` (lilcom decoding of the features,
  padding, tokenising) and a DataLoader, for each ``--workers`` count (0: on the calling thread, as
  the trainer runs by default on CPU), timed from the loader's creation (worker start-up included) to
  its ``--batches``-th batch, without training;
* **the trainer's consumption** (frames/s of its training step on the same batches, pre-collated in
  memory: nothing to load);
* **the trainer fed by the loader** (the step and the loader together, as in training), per worker
  count: its frames/s against the consumption above is what loading costs the step (1.0: nothing).

The loader's frames/s divided by the consumption says how much headroom the loader has (below 1
the step waits for data, unless workers overlap the two). Rounds alternate ``--repeats`` times and
medians are kept, as this machine is shared. Prints the figures and writes JSON.

Figures are per rank: a run of K ranks has K loaders and K steps, one per rank.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from asr_parallel.bin.bench_train import trainer_loop
from asr_parallel.config import add_config_args, load_config
from asr_parallel.utils.io import atomic_write_json


def shard_batches(cfg, sp, n: int):
    """The batches (CutSets) of rank 0's shard in epoch 0, as the trainer samples them, and the
    seconds the sampler took to draw them (at least ``n``)."""
    from lhotse import load_manifest

    from asr_parallel.train.data import filter_for_ctc, make_sampler

    path = Path(cfg.data_dir) / "fbank" / "chime6-ihm_cuts_train.jsonl.gz"
    if not path.is_file():
        raise SystemExit(f"bench_loader: {path} not found: run stages 0-4 of the recipe first")
    from asr_parallel.models import build_model

    model = build_model(cfg.model, cfg.features.num_mel_bins, sp.get_piece_size())
    cuts = filter_for_ctc(load_manifest(path), sp, model.output_lengths, "train", report=False)[0]
    t0 = time.perf_counter()
    sampler = make_sampler(cuts, cfg.train.max_duration, cfg.train.num_buckets, True, 0, cfg.train.world_size,
                           cfg.train.seed)
    sampler.set_epoch(0)
    plan = list(sampler)
    plan_seconds = time.perf_counter() - t0
    if len(plan) < n:
        raise SystemExit(f"bench_loader: rank 0's shard has {len(plan)} batches, fewer than --batches {n}")
    if cfg.train.pad_growth > 1.0:
        raise SystemExit("bench_loader: give train.pad_growth 1.0 (the padding ladders are measured from the plan)")
    return plan, plan_seconds


def padding_figures(plan, growths) -> dict:
    """For the whole epoch plan, per ``train.pad_growth``: the distinct padded frame counts (batch
    shapes along time) and the frames computed (batch size x padded length) per real frame."""
    from asr_parallel.train.data import PAD_UNIT, ladder

    real = sum(c.num_frames for cuts in plan for c in cuts)
    out = {}
    for g in growths:
        lengths = [(len(cuts), max(c.num_frames for c in cuts)) for cuts in plan]
        padded = [(b, ladder(t, PAD_UNIT, g) if g > 1.0 else t) for b, t in lengths]
        out[str(g)] = {"distinct_frame_counts": len({t for _, t in padded}),
                       "computed_per_real_frame": round(sum(b * t for b, t in padded) / real, 4)}
    return out


def time_loader(dataset, plan, workers: int, pin: bool) -> tuple[float, float, int]:
    """Seconds from creating the loader to its first and to its last batch, and the frames it delivered."""
    from asr_parallel.train.data import loader

    t0 = time.perf_counter()
    first, frames = None, 0
    for b in loader(dataset, plan, workers, pin):
        first = first if first is not None else time.perf_counter() - t0
        frames += b.num_frames
    return first, time.perf_counter() - t0, frames


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--batches", type=int, default=12, help="batches per timed pass")
    p.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to measure")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training step (one per rank)")
    p.add_argument("--output", default="exp/bench/loader.json")
    args = p.parse_args(argv)

    import sentencepiece as spm

    from asr_parallel.models import build_model
    from asr_parallel.strategies.base import DistContext
    from asr_parallel.tokenizer import lang_dir_name
    from asr_parallel.train.data import CutDataset
    from asr_parallel.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides + ["strategy.name=single"])
    bpe = Path(cfg.data_dir) / lang_dir_name(cfg.tokenizer) / "bpe.model"
    if not bpe.is_file():
        raise SystemExit(f"bench_loader: {bpe} not found: run stages 0-4 of the recipe first")
    sp = spm.SentencePieceProcessor(model_file=str(bpe))
    workers = [int(w) for w in args.workers.split(",")]
    epoch, plan_seconds = shard_batches(cfg, sp, args.batches)
    plan, per_epoch = epoch[:args.batches], len(epoch)
    padding = padding_figures(epoch, [1.0, 1.1, 1.25, 1.5])
    dataset = CutDataset(sp, cfg.train.pad_growth)
    use_cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    torch.manual_seed(cfg.train.seed)
    trainer = Trainer.for_benchmark(cfg, DistContext(device=device), build_model(
        cfg.model, cfg.features.num_mel_bins, sp.get_piece_size()).to(device))
    batches = [dataset[c] for c in plan]
    if use_cuda:
        batches = [b.pin_memory() for b in batches]
    frames = sum(b.num_frames for b in batches)
    trainer_loop(trainer, batches[:2])  # warm-up (allocator, lazy initialisation)

    def fed(w: int) -> float:
        from asr_parallel.train.data import loader

        sync = torch.cuda.synchronize if use_cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for b in loader(dataset, plan, w, use_cuda):
            trainer.train_step(b)
        sync()
        return time.perf_counter() - t0

    loads: dict[int, list[float]] = {w: [] for w in workers}
    firsts: dict[int, list[float]] = {w: [] for w in workers}
    feds: dict[int, list[float]] = {w: [] for w in workers}
    steps: list[float] = []
    for _ in range(args.repeats):
        for w in workers:
            first, seconds, got = time_loader(dataset, plan, w, use_cuda)
            firsts[w].append(first)
            if got != frames:
                raise RuntimeError(f"bench_loader: the loader with {w} workers gave {got} frames, not {frames}")
            loads[w].append(seconds)
        steps.append(trainer_loop(trainer, batches))
        for w in workers:
            feds[w].append(fed(w))

    consume = frames / statistics.median(steps)
    results = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "device": str(device), "torch_threads": args.threads, "model": cfg.model.name,
        "max_duration": cfg.train.max_duration, "batches": len(plan), "frames": frames,
        "batches_per_epoch_rank0": per_epoch, "epoch_plan_seconds": round(plan_seconds, 4),
        "trainer_step_frames_per_second": round(consume, 1),
        "trainer_step_seconds": [round(s, 3) for s in steps],
        "padding_by_pad_growth": padding,
        "workers": {},
    }
    print(f"epoch plan (rank 0's {per_epoch} batches of {cfg.train.world_size} shard(s)): {plan_seconds:.3f} s")
    for g, fig in padding.items():
        print(f"pad_growth {g}: {fig['distinct_frame_counts']} batch lengths in the epoch, "
              f"{fig['computed_per_real_frame']:.3f} frames computed per real frame")
    print(f"training step alone ({cfg.model.name}, {args.threads} thread(s), {device}): {consume:,.0f} frames/s")
    for w in workers:
        load = frames / statistics.median(loads[w])
        with_loader = frames / statistics.median(feds[w])
        results["workers"][str(w)] = {
            "loader_frames_per_second": round(load, 1), "loader_seconds": [round(s, 3) for s in loads[w]],
            "first_batch_seconds": round(statistics.median(firsts[w]), 3),
            "headroom": round(load / consume, 2),
            "fed_frames_per_second": round(with_loader, 1), "fed_seconds": [round(s, 3) for s in feds[w]],
            "fed_over_step_alone": round(with_loader / consume, 3),
        }
        print(f"workers {w}: loader {load:,.0f} frames/s ({load / consume:.1f}x the step's consumption; first "
              f"batch after {statistics.median(firsts[w]):.2f} s); "
              f"step fed by it {with_loader:,.0f} frames/s ({with_loader / consume:.3f} of the step alone)")
    atomic_write_json(args.output, results)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
