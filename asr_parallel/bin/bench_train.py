"""Benchmark: the project's trainer against a bare PyTorch loop, on the same model and batches, in
one run; and the decoding real-time factor.

Both loops run ``--steps`` optimiser steps over the same pre-collated batches (from the recipe's
training features when they exist, else synthetic ones of the same shape), after ``--warmup`` steps
each. The bare loop is forward, CTC loss, backward, gradient clipping and the optimiser step; the
trainer's step adds its checks, schedule and strategy hooks (SpecAugment is off in both, being part
of the data, not of the loop). They alternate in ``--repeats`` rounds and the medians are compared,
since this machine is shared and noisy. Prints frames/s of both and their ratio, and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from asr_parallel.config import add_config_args, load_config
from asr_parallel.utils.io import atomic_write_json


# Dense peak TFLOP/s (no structured sparsity) from NVIDIA's datasheets, by the name torch reports and
# the precision of the step's matmuls; first match wins. Other devices: --peak-tflops or --measure-peak.
PEAK_TFLOPS = [
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H200 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM (GH200's GPU: the same figures)
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]


def matmul_precision(bf16: bool, device) -> str:
    if bf16:
        return "bf16"
    return "tf32" if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "fp32"


def measured_matmul_tflops(device, precision: str, n: int = 0, repeats: int = 10) -> float:
    """TFLOP/s of an n x n by n x n matmul in ``precision`` on ``device``, the best of ``repeats``
    (measured: what the device's matmul reaches here, a practical peak to set the model against)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best, per = float("inf"), 10  # back-to-back products per timing: launch and sync costs amortised
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(per):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - t0) / per)
    return 2 * n ** 3 / best / 1e12


def utilisation(model, fps: float, device, precision: str, devices: int = 1, peak: float = 0.0,
                measure: bool = False) -> dict:
    """Model FLOP utilisation: 3 x the model's forward FLOPs per input frame (modelled from its layer
    table, :meth:`AcousticModel.flops_per_frame`: forward, and twice that backward) times ``fps``, the
    measured frames/s of distinct training data (a pipeline's ranks share their minibatches), over
    ``devices`` devices' peak: ``peak`` (TFLOP/s per device, given), else the datasheet's
    (:data:`PEAK_TFLOPS`), and with ``measure`` also over the measured matmul rate of
    :func:`measured_matmul_tflops` (on this process's device)."""
    flops = 3 * model.flops_per_frame() * fps
    out = {"precision": precision, "model_forward_flops_per_frame": model.flops_per_frame(), "devices": devices,
           "model_flops_per_second": flops, "model_tflops": round(flops / 1e12, 4)}
    source = "given"
    if not peak and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak, source = next(((p[precision], f"datasheet ({key}, dense {precision})") for key, p in PEAK_TFLOPS
                             if key in name), (0.0, None))
    if peak:
        out.update({"peak_tflops": peak, "peak_source": source, "mfu": flops / (devices * peak * 1e12)})
    if measure:
        m = measured_matmul_tflops(device, precision)
        out.update({"matmul_tflops_measured": m, "fraction_of_measured_matmul": flops / (devices * m * 1e12)})
    return out


def get_batches(cfg, n: int, sp):
    from asr_parallel.train.data import Batch, CutDataset, make_sampler

    path = Path(cfg.data_dir) / "fbank" / "chime6-ihm_cuts_train.jsonl.gz"
    if path.is_file() and sp is not None:
        from lhotse import load_manifest

        sampler = make_sampler(load_manifest(path), cfg.train.max_duration, cfg.train.num_buckets, True, 0, 1,
                               cfg.train.seed)
        ds = CutDataset(sp, cfg.train.pad_growth)
        batches = []
        for cuts in sampler:
            batches.append(ds[cuts])
            if len(batches) == n:
                break
        return batches, "recipe features"
    g = torch.Generator().manual_seed(0)
    frames = int(cfg.train.max_duration * 100 / 8)
    return [Batch(torch.randn(8, frames, cfg.features.num_mel_bins, generator=g), torch.full((8,), frames),
                  [[int(x) for x in torch.randint(3, 100, (frames // 30,), generator=g)] for _ in range(8)],
                  [""] * 8, [f"synthetic{i}" for i in range(8)]) for _ in range(n)], "synthetic"


def bare_loop(model, batches, device, bf16: bool, train_cfg) -> float:
    """The baseline: the same model, batches and optimiser settings through plain torch calls (no
    helper of this project's training code: its loss, optimiser factory and step are what the trainer
    adds and what this measures). Of the model it uses the forward pass and ``output_lengths``, the
    frames its output has per utterance (arithmetic on the host lengths, as CTC wants them); host
    tensors are pinned and copied without waiting, as the trainer does."""
    import torch.nn.functional as F

    tc = train_cfg
    fused = {"fused": True} if device.type == "cuda" else {}
    if tc.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay, **fused)
    else:
        cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
        opt = cls(model.parameters(), lr=tc.lr, betas=(tc.momentum, 0.999), weight_decay=tc.weight_decay, **fused)
    model.train()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for b in batches:
        pin = device.type == "cuda"
        feats = (b.feats.pin_memory() if pin else b.feats).to(device, non_blocking=True)
        targets = torch.tensor([t for seq in b.tokens for t in seq], dtype=torch.long)
        targets = (targets.pin_memory() if pin else targets).to(device, non_blocking=True)
        target_lens = torch.tensor([len(seq) for seq in b.tokens], dtype=torch.long)
        lens = (b.feat_lens.pin_memory() if pin else b.feat_lens).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False):
            logits, _ = model(feats, lens)
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)
        out_lens = model.output_lengths(b.feat_lens)  # on the host, where CTC reads them (no copy back)
        loss = F.ctc_loss(log_probs, targets, out_lens, target_lens, blank=0,
                          reduction="sum") / len(b.tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
    sync()
    return time.perf_counter() - t0


def trainer_loop(trainer, batches) -> float:
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for b in batches:
        trainer.train_step(b)
    sync()
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_args(p)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default="exp/bench/train_loop.json")
    p.add_argument("--decode", action="store_true", help="also measure decoding real-time factor on dev")
    p.add_argument("--other-precision", action="store_true",
                   help="also time the bare loop at the other precision (float32 against bf16) in each round: "
                        "what bf16 autocast gains or costs on this device, measured in the same run")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the device's peak TFLOP/s in the step's precision, for model FLOP utilisation "
                        "(0: the datasheet's for known GPUs)")
    p.add_argument("--measure-peak", action="store_true",
                   help="also time a large matmul in the step's precision and report the trainer's model "
                        "FLOP/s as a fraction of it")
    args = p.parse_args(argv)

    import sentencepiece as spm

    from asr_parallel.bin.train import setup_distributed
    from asr_parallel.strategies.base import DistContext
    from asr_parallel.tokenizer import lang_dir_name
    from asr_parallel.train.trainer import Trainer, code_version

    cfg = load_config(args.config, args.overrides + ["train.spec_augment=false"])
    import os

    dist = setup_distributed(cfg) if "TORCHELASTIC_RUN_ID" in os.environ else None
    bpe = Path(cfg.data_dir) / lang_dir_name(cfg.tokenizer) / "bpe.model"
    sp = spm.SentencePieceProcessor(model_file=str(bpe)) if bpe.is_file() else None
    batches, source = get_batches(cfg, args.warmup + args.steps, sp)
    if dist is None:
        use_cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
        dist = DistContext(device=torch.device("cuda" if use_cuda else "cpu"))
    device = dist.device
    from asr_parallel.train.step import bf16_enabled, cpu_has_native_bf16

    bf16 = bf16_enabled(cfg.train, device)
    vocab = sp.get_piece_size() if sp else 500
    from asr_parallel.models import build_model

    torch.manual_seed(cfg.train.seed)
    base = build_model(cfg.model, cfg.features.num_mel_bins, vocab)
    trainer = Trainer.for_benchmark(cfg, dist, copy.deepcopy(base).to(device))
    bare_model = copy.deepcopy(base).to(device)
    if cfg.train.compile:  # the baseline compiled alike (torch.compile is plain torch)
        for stage in bare_model.stages:
            stage.compile(backend=cfg.train.compile_backend)
    frames = sum(b.num_frames for b in batches[args.warmup:])
    bare_loop(bare_model, batches[:args.warmup], device, bf16, cfg.train)
    trainer_loop(trainer, batches[:args.warmup])
    other_model = copy.deepcopy(bare_model) if args.other_precision else None
    if other_model is not None:
        bare_loop(other_model, batches[:args.warmup], device, not bf16, cfg.train)
    t_bare, t_trainer, t_other = [], [], []
    for _ in range(args.repeats):
        t_bare.append(bare_loop(bare_model, batches[args.warmup:], device, bf16, cfg.train))
        t_trainer.append(trainer_loop(trainer, batches[args.warmup:]))
        if other_model is not None:
            t_other.append(bare_loop(other_model, batches[args.warmup:], device, not bf16, cfg.train))
    fps_bare = frames / statistics.median(t_bare) * dist.world_size
    fps_trainer = frames / statistics.median(t_trainer) * dist.world_size
    result = {
        "machine": f"{platform.node()}", "cpu": platform.processor() or platform.machine(),
        "code": code_version(), "env_ASR_PARALLEL_BF16_CPU": os.environ.get("ASR_PARALLEL_BF16_CPU"),
        "onednn_primitive_cache": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"),
        "device": str(device), "bf16": bf16, "tf32": bool(cfg.train.tf32) if device.type == "cuda" else None,
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(), "model": cfg.model.name, "params": base.num_params(),
        "conformer_block": cfg.model.conformer.block if cfg.model.name == "conformer" else None,
        "compile": cfg.train.compile_backend if cfg.train.compile else None,
        "strategy": cfg.strategy["name"], "world_size": dist.world_size, "batches": source,
        "steps": args.steps, "repeats": args.repeats, "frames_per_repeat": frames,
        "bare_frames_per_second": round(fps_bare, 1), "trainer_frames_per_second": round(fps_trainer, 1),
        "ratio_trainer_to_bare": round(fps_trainer / fps_bare, 4),
        "seconds_bare": [round(t, 3) for t in t_bare], "seconds_trainer": [round(t, 3) for t in t_trainer],
        # how far the repeats agree: slowest over fastest, less one
        "repeat_spread": {"bare": round(max(t_bare) / min(t_bare) - 1, 4),
                          "trainer": round(max(t_trainer) / min(t_trainer) - 1, 4)},
    }
    if t_other:
        fps_other = frames / statistics.median(t_other) * dist.world_size
        fps_bf16, fps_f32 = (fps_bare, fps_other) if bf16 else (fps_other, fps_bare)
        result.update({"native_cpu_bf16": cpu_has_native_bf16() if device.type == "cpu" else None,
                       "bare_float32_frames_per_second": round(fps_f32, 1),
                       "bare_bf16_frames_per_second": round(fps_bf16, 1),
                       "ratio_bf16_to_float32_bare": round(fps_bf16 / fps_f32, 4),
                       "seconds_bare_other_precision": [round(t, 3) for t in t_other]})
    # distinct frames/s: every data shard's (a pipeline's ranks train the same minibatches); the devices
    # the ranks run on (ranks sharing a GPU through gloo count it once)
    shards = trainer.strategy.data_shard()[1]
    devices = min(dist.world_size, torch.cuda.device_count()) if device.type == "cuda" else 1
    result["utilisation"] = utilisation(base, frames / statistics.median(t_trainer) * shards, device,
                                        matmul_precision(bf16, device), devices, args.peak_tflops, args.measure_peak)
    if args.decode and dist.is_main:
        result["decode"] = decode_rtf(cfg, base, device, sp)
    if dist.is_main:
        print(json.dumps(result, indent=2))
        print(f"{cfg.model.name} on {device}{' bf16' if bf16 else ''}: bare loop {fps_bare:,.0f} frames/s, trainer "
              f"{fps_trainer:,.0f} frames/s, ratio {fps_trainer / fps_bare:.3f}")
        u = result["utilisation"]
        print(f"model FLOP/s (modelled FLOPs x measured frames/s): {u['model_flops_per_second'] / 1e12:.4f} TFLOP/s"
              + (f", MFU {u['mfu']:.1%} of {u['peak_tflops']:g} ({u['peak_source']})" if "mfu" in u else "")
              + (f", {u['fraction_of_measured_matmul']:.1%} of a measured {u['matmul_tflops_measured']:.3g} TFLOP/s "
                 "matmul" if "matmul_tflops_measured" in u else ""))
        if t_other:
            print(f"bare loop in bf16 against float32: {result['bare_bf16_frames_per_second']:,.0f} against "
                  f"{result['bare_float32_frames_per_second']:,.0f} frames/s, ratio {result['ratio_bf16_to_float32_bare']:.3f}")
        atomic_write_json(args.output, result)
    if dist.distributed:
        import torch.distributed as tdist

        tdist.destroy_process_group()


def decode_rtf(cfg, model, device, sp) -> dict:
    """Real-time factor of greedy and WFST decoding on the dev worn-microphone set (untrained model:
    speed only; WFST search is slower on a trained model's peakier outputs only through the beam)."""
    from lhotse import load_manifest

    from asr_parallel.bin.prepare_graph import graph_paths
    from asr_parallel.decode.run import network_outputs
    from asr_parallel.decode.wfst import WfstDecoder

    path = Path(cfg.data_dir) / "fbank" / "chime6-ihm_cuts_dev.jsonl.gz"
    _, graph = graph_paths(cfg)
    if not path.is_file() or not graph.is_file():
        return {"skipped": "no dev features or graph; run stages 0-4"}
    cuts = load_manifest(path)
    audio = sum(c.duration for c in cuts)
    t0 = time.perf_counter()
    outputs = network_outputs(model.to(device), cuts, device)
    t_net = time.perf_counter() - t0
    dec = WfstDecoder(graph, graph.parent / "words.txt", cfg.decode.beam,
                      cfg.decode.max_active)
    t0 = time.perf_counter()
    for lp, _ in outputs.values():
        dec.decode(lp, 1.0)
    t_wfst = time.perf_counter() - t0
    return {"audio_seconds": round(audio, 1), "rtf_network": round(t_net / audio, 5),
            "rtf_wfst_search": round(t_wfst / audio, 5)}


if __name__ == "__main__":
    main()
