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
                        "--steps", "2", "--warmup", "1", "--repeats", "1", "--output", str(out)],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["batches"] == "synthetic" and d["bare_frames_per_second"] > 0 and d["ratio_trainer_to_bare"] > 0
    assert "ratio" in r.stdout


def test_data_benchmark_writes_rates(tmp_path):
    out = tmp_path / "data.json"
    r = subprocess.run([sys.executable, "-m", "asr_parallel.bin.bench_data", "--minutes", "0.2", "--sessions", "S03",
                        "--output", str(out)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["sessions"]["S03"]["session_hours_per_minute"] > 0 and d["features"]["real_time_factor"] > 0
