"""The benchmark entry points run and write their figures (they are measured, not asserted, here)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_train_loop_benchmark_writes_ratio(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "asr_parallel.bin.bench_train", "--set", f"data_dir={tmp_path}/none",
                        "--set", "model.name=mlp", "--set", "model.mlp.hidden_dim=64", "--set", "train.max_duration=10",
                        "--steps", "2", "--warmup", "1", "--repeats", "1", "--output", str(out),
                        "--peak-tflops", "2.5", "--measure-peak"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["batches"] == "synthetic" and d["bare_frames_per_second"] > 0 and d["ratio_trainer_to_bare"] > 0
    assert "ratio" in r.stdout
    # model FLOP utilisation: 3 x the model's forward FLOPs per frame x the trainer's frames/s over the peak
    u = d["utilisation"]
    from asr_parallel.config import load_config
    from asr_parallel.models import build_model

    cfg = load_config(REPO / "recipes/chime6_sim.yaml", ["model.name=mlp", "model.mlp.hidden_dim=64"])
    assert u["model_forward_flops_per_frame"] == build_model(cfg.model, cfg.features.num_mel_bins, 500).flops_per_frame()
    flops = 3 * u["model_forward_flops_per_frame"] * d["trainer_frames_per_second"]  # one rank: its frames/s
    assert u["model_flops_per_second"] > 0 and abs(u["model_flops_per_second"] / flops - 1) < 1e-3
    assert u["devices"] == 1 and u["precision"] in ("bf16", "fp32")
    assert u["peak_tflops"] == 2.5 and u["mfu"] > 0 and abs(u["mfu"] - u["model_flops_per_second"] / 2.5e12) < 1e-12
    assert u["matmul_tflops_measured"] > 0 and "MFU" in r.stdout
    assert abs(u["fraction_of_measured_matmul"] / (u["model_flops_per_second"] / (u["matmul_tflops_measured"] * 1e12)) - 1) < 1e-9


def test_data_benchmark_writes_rates(tmp_path):
    out = tmp_path / "data.json"
    r = subprocess.run([sys.executable, "-m", "asr_parallel.bin.bench_data", "--minutes", "0.2", "--sessions", "S03",
                        "--output", str(out)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["sessions"]["S03"]["session_hours_per_minute"] > 0 and d["features"]["real_time_factor"] > 0


def test_loader_benchmark_sets_the_loader_against_the_step(prepared, tmp_path):
    from chime6_fixture import TINY_SIMULATION

    out = tmp_path / "loader.json"
    cmd = [sys.executable, "-m", "asr_parallel.bin.bench_loader", "--set", f"data_dir={prepared}"]
    for o in TINY_SIMULATION + ["model.name=mlp", "model.mlp.hidden_dim=64", "train.max_duration=20"]:
        cmd += ["--set", o]
    r = subprocess.run(cmd + ["--batches", "2", "--workers", "0,1", "--repeats", "1", "--output", str(out)],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["batches"] == 2 and d["frames"] > 0 and d["trainer_step_frames_per_second"] > 0
    for w in ("0", "1"):
        fig = d["workers"][w]
        assert fig["loader_frames_per_second"] > 0 and fig["fed_frames_per_second"] > 0
        assert fig["headroom"] == round(fig["loader_frames_per_second"] / d["trainer_step_frames_per_second"], 2)
