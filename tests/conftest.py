"""Shared fixtures. Tests keep torch to one thread: two ranks on two cores is the normal setting."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
# float32 on every CPU: train.bf16_cpu "auto" would otherwise turn bf16 on where the CPU has it, and
# the exactness checks would depend on the machine (the tests of bf16 itself set train.bf16_cpu=true)
os.environ.setdefault("ASR_PARALLEL_BF16_CPU", "0")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from chime6_fixture import TINY_SIMULATION, make_fixture_corpus  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fixture_corpus(tmp_path_factory) -> Path:
    """A tiny hand-made corpus in the real CHiME-6 layout (not produced by the simulator)."""
    root = tmp_path_factory.mktemp("chime6_fixture") / "CHiME6"
    make_fixture_corpus(root)
    return root


@pytest.fixture(scope="session")
def simulated(tmp_path_factory) -> Path:
    """A tiny simulated corpus (stage 0 only); returns the data dir."""
    from asr_parallel.config import load_config
    from asr_parallel.corpus.simulate import simulate_corpus

    data = tmp_path_factory.mktemp("sim")
    cfg = load_config(REPO / "recipes/chime6_sim.yaml", TINY_SIMULATION + [f"data_dir={data}"])
    simulate_corpus(data / "corpus", data, cfg.corpus.simulation, num_jobs=2)
    return data


def run_entry(module_or_script: str, data: Path, *extra: str):
    """Run a stage entry point on the tiny simulated corpus in ``data``."""
    import subprocess

    cmd = [sys.executable] + (["-m", module_or_script] if not module_or_script.endswith(".py")
                              else [str(REPO / module_or_script)])
    cmd += ["--config", str(REPO / "recipes/chime6_sim.yaml"), "--set", f"data_dir={data}"]
    for o in TINY_SIMULATION:
        cmd += ["--set", o]
    cmd += list(extra)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)


@pytest.fixture(scope="session")
def prepared(simulated) -> Path:
    """Stages 0 (already generated: only marked) to 4 on the tiny simulated corpus; the data dir."""
    for step in ["local/prepare_corpus.py", "local/prepare_manifests.py", "asr_parallel.bin.compute_fbank",
                 "asr_parallel.bin.train_bpe", "asr_parallel.bin.prepare_graph"]:
        r = run_entry(step, simulated)
        assert r.returncode == 0, r.stderr[-3000:]
    return simulated
