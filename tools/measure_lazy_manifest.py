"""Memory and time of the training manifest read eagerly or lazily (``train.lazy_manifests``) at a
larger corpus's scale: the recipe's training cuts written ``--copies`` times under new ids, then, in
a fresh process per mode, the manifest read, filtered for CTC (the default model's output lengths)
and rank 0's epoch plans of ``--ranks`` ranks drawn and held, as the trainer holds them (the
epoch's, and the next one drawn while it trains). Prints one line per mode (peak resident memory
above the process's own before reading, after each step) and writes JSON.

    .venv/bin/python tools/measure_lazy_manifest.py --copies 55
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(mode: str, path: str, config: str, ranks: int, max_duration: float) -> dict:
    import sentencepiece as spm
    from lhotse import load_manifest, load_manifest_lazy

    from asr_parallel.config import load_config
    from asr_parallel.models import build_model
    from asr_parallel.tokenizer import lang_dir_name
    from asr_parallel.train.data import filter_for_ctc, make_sampler

    cfg = load_config(config, [])
    sp = spm.SentencePieceProcessor(model_file=str(Path(cfg.data_dir) / lang_dir_name(cfg.tokenizer) / "bpe.model"))
    model = build_model(cfg.model, cfg.features.num_mel_bins, sp.get_piece_size())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    cuts = (load_manifest_lazy if mode == "lazy" else load_manifest)(path)
    kept, stats = filter_for_ctc(cuts, sp, model.output_lengths, "train", report=False)
    t1 = time.perf_counter()
    peak_filtered = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    plans = []  # held as the trainer holds them: the epoch's plan, and the next one drawn meanwhile
    for epoch in (0, 1):
        sampler = make_sampler(kept, max_duration, cfg.train.num_buckets, True, 0, ranks, cfg.train.seed)
        sampler.set_epoch(epoch)
        plans.append(list(sampler))
        if epoch == 0:
            t2 = time.perf_counter()
            peak_one = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_two = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mb = lambda kb: round((kb - before) / 1024)  # noqa: E731
    return {"mode": mode, "kept": stats["kept"], "load_filter_seconds": round(t1 - t0, 2),
            "plan_seconds": round(t2 - t1, 2), "plan_batches_rank0": len(plans[0]),
            "peak_rss_above_start_mb": {"manifest_filtered": mb(peak_filtered), "one_plan_held": mb(peak_one),
                                        "two_plans_held": mb(peak_two)},
            "start_rss_mb": round(before / 1024)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="recipes/chime6_sim.yaml")
    p.add_argument("--copies", type=int, default=55)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--max-duration", type=float, default=30.0)
    p.add_argument("--output", default="exp/bench/lazy_manifest.json")
    p.add_argument("--measure", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:  # the child: one mode in a fresh process
        print(json.dumps(measure(args.measure[0], args.measure[1], args.config, args.ranks, args.max_duration)))
        return
    from lhotse import load_manifest
    from lhotse.serialization import SequentialJsonlWriter

    from asr_parallel.config import load_config
    from asr_parallel.utils.io import atomic_write_json

    cfg = load_config(args.config, [])
    cuts = load_manifest(Path(cfg.data_dir) / "fbank/chime6-ihm_cuts_train.jsonl.gz")
    results = {"copies": args.copies, "ranks": args.ranks, "max_duration": args.max_duration, "modes": []}
    with tempfile.TemporaryDirectory() as tmp:
        big = str(Path(tmp) / "big.jsonl.gz")
        with SequentialJsonlWriter(big) as w:
            for r in range(args.copies):
                for c in cuts:
                    w.write(c.with_id(f"{c.id}-r{r}"))
        results["cuts"] = args.copies * len(cuts)
        results["manifest_bytes"] = Path(big).stat().st_size
        for mode in ("eager", "lazy"):
            out = subprocess.run([sys.executable, __file__, "--config", args.config, "--ranks", str(args.ranks),
                                  "--max-duration", str(args.max_duration), "--measure", mode, big],
                                 cwd=REPO, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results["modes"].append(r)
            m = r["peak_rss_above_start_mb"]
            print(f"{mode}: {r['kept']} cuts kept, load and filter {r['load_filter_seconds']} s, epoch plan "
                  f"{r['plan_seconds']} s ({r['plan_batches_rank0']} batches, rank 0 of {args.ranks}); peak memory "
                  f"above the start: +{m['manifest_filtered']} MB filtered, +{m['one_plan_held']} MB with the "
                  f"epoch's plan, +{m['two_plans_held']} MB with the next one too")
    atomic_write_json(args.output, results)


if __name__ == "__main__":
    main()
