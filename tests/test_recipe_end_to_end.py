"""run.sh stages 4-7 on the tiny simulated corpus: graph, training (1 process, and 2 gloo ranks under
torchrun with sync_sgd), decoding and scoring, ending in the WER table and results.json."""

import json
import subprocess
from pathlib import Path

from chime6_fixture import TINY_SIMULATION

REPO = Path(__file__).resolve().parents[1]
TINY_TRAINING = ["model.name=mlp", "model.mlp.num_layers=2", "model.mlp.hidden_dim=64", "train.max_steps=8",
                 "train.max_duration=20", "train.num_buckets=2", "train.log_every_steps=2", "decode.lm_weights=[0.5,1.0]"]


def run_sh(data: Path, exp: Path, *extra: str) -> subprocess.CompletedProcess:
    overrides = " ".join(TINY_SIMULATION + TINY_TRAINING + [f"data_dir={data}", f"exp_dir={exp}", *extra])
    return subprocess.run(["bash", str(REPO / "run.sh"), "--setup", "false", "--stage", "4", "--overrides",
                           overrides], cwd=REPO, capture_output=True, text=True)


def check_results(exp_run: Path):
    results = json.loads((exp_run / "results.json").read_text())
    for method in ("greedy", "wfst"):
        for split in ("dev", "eval"):
            for cond in ("worn", "array"):
                total = results[method][split][cond]["total"]
                assert total["words"] > 0 and 0 <= total["wer"]
    assert results["wfst"]["lm_weight"] in (0.5, 1.0)
    assert results["train_summary"]["steps"] == 8
    assert results["timing"]["rtf_greedy"] > 0
    report = (exp_run / "wer_report.txt").read_text()
    assert "%WER" in report and "session S02" in report and "location kitchen" in report
    return results


def test_stages_4_to_7_single_process(prepared, tmp_path):
    r = run_sh(prepared, tmp_path / "exp")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "| method | dev worn | dev array | eval worn | eval array |" in r.stdout
    check_results(tmp_path / "exp" / "mlp_single_w1")
    # Re-running skips the finished training and decoding.
    r = run_sh(prepared, tmp_path / "exp")
    assert r.returncode == 0
    assert "training already finished" in r.stdout and "already decoded" in r.stdout


def test_two_gloo_ranks_under_torchrun(prepared, tmp_path):
    r = run_sh(prepared, tmp_path / "exp", "train.world_size=2", "strategy.name=sync_sgd")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    results = check_results(tmp_path / "exp" / "mlp_sync_sgd_w2")
    summary = results["train_summary"]
    assert summary["world_size"] == 2 and summary["bytes_sent_per_rank"] == 8 * summary["params"] * 4
