"""run.sh: help, option parsing, stage logging, idempotence, and resume after a kill."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from asr_parallel.corpus import chime6
from chime6_fixture import TINY_SIMULATION

REPO = Path(__file__).resolve().parents[1]


def run_sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "run.sh"), "--setup", "false", *args], cwd=REPO,
                          capture_output=True, text=True)


def test_help_lists_stages_and_options():
    r = run_sh("--help")
    assert r.returncode == 0
    for text in ["0  corpus", "1  manifests", "2  features", "3  tokenizer", "4  graph", "5  train",
                 "6  decode", "7  score", "--stage", "--stop-stage", "--config", "--corpus-dir"]:
        assert text in r.stdout


def test_unknown_option_and_missing_value():
    r = run_sh("--stgae", "1")
    assert r.returncode == 1 and "unknown option --stgae" in r.stderr
    r = run_sh("--stage")
    assert r.returncode == 1 and "needs a value" in r.stderr


def test_real_layout_corpus_end_to_end_and_rerun(fixture_corpus, tmp_path):
    args = ["--config", "recipes/chime6.yaml", "--corpus-dir", str(fixture_corpus), "--stop-stage", "3",
            "--overrides", f"data_dir={tmp_path}/data tokenizer.vocab_size=40"]
    # a simulated corpus's sentence pools left in the data directory: removed by stage 0, so that
    # stage 4's decode.lm_extra_text auto does not take the simulated text for this corpus's
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sentences.json").write_text('{"train": ["A b."], "eval": ["C d."]}')
    r = run_sh(*args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert not (tmp_path / "data" / "sentences.json").exists()
    for n, name in enumerate(["corpus", "manifests", "features", "tokenizer"]):
        assert f"Stage {n} ({name}): start" in r.stdout and f"Stage {n} ({name}): done in" in r.stdout
    assert (tmp_path / "data/lang_bpe_40/tokens.txt").is_file()
    r = run_sh(*args)
    assert r.returncode == 0
    assert r.stderr.count("already done with these inputs") == 4
    # --stage/--stop-stage select stages.
    r = run_sh(*args, "--stage", "2", "--stop-stage", "2")
    assert "Stage 2 (features): start" in r.stdout and "Stage 1" not in r.stdout and "Stage 3" not in r.stdout


def test_failing_stage_names_itself(tmp_path):
    r = run_sh("--corpus-dir", str(tmp_path / "nowhere"), "--overrides", f"data_dir={tmp_path}/data")
    assert r.returncode == 1
    assert "ERROR: stage 0 (corpus)" in r.stderr and "no such directory" in r.stderr
    assert "Stage 0 (corpus): FAILED" in r.stdout


def test_corpus_generation_resumes_after_kill(tmp_path):
    data = tmp_path / "data"
    cmd = [sys.executable, str(REPO / "local/prepare_corpus.py"), "--set", f"data_dir={data}", "--num-jobs", "1"]
    for o in TINY_SIMULATION:
        cmd += ["--set", o]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((data / ".done").glob("sim_*.done"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.stem.removeprefix("sim_") for p in (data / ".done").glob("sim_*.done")}
    assert 3 <= len(done_before) < 20, "the kill should land part-way through"
    assert not (data / ".done" / "stage0_corpus.done").exists()
    stamps = {s: chime6.transcript_file(data / "corpus", chime6.part_of(s), s).stat().st_mtime_ns for s in done_before}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"simulating {20 - len(done_before)} of 20 sessions" in r.stderr
    for s, stamp in stamps.items():
        assert chime6.transcript_file(data / "corpus", chime6.part_of(s), s).stat().st_mtime_ns == stamp
    assert chime6.check_corpus(data / "corpus", need_arrays=("dev", "eval")).ok
    assert not [p for p in (data / "corpus").rglob("*") if p.name.startswith(".")]
