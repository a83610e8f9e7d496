"""Bad input ends in a clear error naming the file, or a counted skip; nothing prepared is lost."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from asr_parallel.corpus import chime6
from chime6_fixture import make_fixture_corpus

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def corpus(fixture_corpus, tmp_path):
    copy = tmp_path / "CHiME6"
    shutil.copytree(fixture_corpus, copy)
    return copy


def stage(script: str, corpus: Path, data: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / script), "--config", str(REPO / "recipes/chime6.yaml"),
           "--corpus-dir", str(corpus), "--set", f"data_dir={data}"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)


def prepare(corpus: Path, data: Path) -> subprocess.CompletedProcess:
    r = stage("local/prepare_corpus.py", corpus, data)
    if r.returncode != 0:
        return r
    return stage("local/prepare_manifests.py", corpus, data)


def test_missing_session_file(corpus):
    path = chime6.transcript_file(corpus, "train", "S12")
    path.unlink()
    report = chime6.check_corpus(corpus)
    assert not report.ok and any(str(path) in p and "missing" in p for p in report.problems)


def test_malformed_json_names_file_and_line(corpus):
    path = chime6.transcript_file(corpus, "dev", "S09")
    path.write_text(path.read_text()[:-40])
    report = chime6.check_corpus(corpus)
    (problem,) = report.problems
    assert str(path) in problem and "malformed JSON at line" in problem


def test_bad_segments_are_skipped_with_counts(corpus):
    path = chime6.transcript_file(corpus, "train", "S03")
    segs = json.loads(path.read_text())
    segs[0]["end_time"] = segs[0]["start_time"]
    segs[1]["words"] = "  "
    path.write_text(json.dumps(segs))
    report = chime6.check_corpus(corpus)
    assert report.ok
    assert report.skipped == {"start_time >= end_time": 1, "empty words": 1}


def test_schema_errors(corpus):
    path = chime6.transcript_file(corpus, "eval", "S01")
    segs = json.loads(path.read_text())
    del segs[0]["ref"]
    segs[1]["start_time"] = "75.3"
    segs[2]["speaker"] = "Bob"
    path.write_text(json.dumps(segs))
    problems = chime6.check_corpus(corpus).problems
    assert any("segment 0: missing field(s) ref" in p for p in problems)
    assert any("segment 1: times must look like H:MM:SS.ss" in p for p in problems)
    assert any("segment 2: speaker 'Bob'" in p for p in problems)
    assert all(str(path) in p for p in problems)


def test_corrupt_and_truncated_wav(corpus):
    bad = chime6.worn_file(corpus, "train", "S04", "P13")
    bad.write_bytes(b"RIFF\x00\x00garbage" * 10)
    trunc = chime6.array_file(corpus, "dev", "S02", "U01", 3)
    data = trunc.read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    problems = chime6.check_corpus(corpus, need_arrays=("dev", "eval")).problems
    assert any(str(bad) in p and "not a readable audio file" in p for p in problems)
    assert any(str(trunc) in p and "truncated" in p for p in problems)


def test_missing_array_files_listed(corpus):
    for c in (1, 2, 3, 4):
        chime6.array_file(corpus, "dev", "S09", "U01", c).unlink()
    chime6.array_file(corpus, "eval", "S21", "U02", 4).unlink()
    problems = chime6.check_corpus(corpus, need_arrays=("dev", "eval")).problems
    assert any("S21_U02.CH4.wav" in p for p in problems)
    assert any("reference array 'U01'" in p for p in problems)


def test_bad_input_fails_the_stage_and_keeps_prepared_manifests(corpus, tmp_path):
    data = tmp_path / "data"
    r = prepare(corpus, data)
    assert r.returncode == 0, r.stderr[-2000:]
    manifests = data / "manifests"
    before = {p.name: p.read_bytes() for p in manifests.iterdir()}
    # The corpus gets damaged; a forced re-run of stage 1 must fail and leave the manifests alone.
    path = chime6.transcript_file(corpus, "dev", "S02")
    path.write_text("{ not json")
    r = subprocess.run([sys.executable, str(REPO / "local/prepare_manifests.py"), "--config",
                        str(REPO / "recipes/chime6.yaml"), "--corpus-dir", str(corpus), "--set", f"data_dir={data}",
                        "--force"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1
    assert "ERROR: stage 1 (manifests)" in r.stderr and str(path) in r.stderr and "malformed JSON" in r.stderr
    assert "Traceback" not in r.stderr
    assert {p.name: p.read_bytes() for p in manifests.iterdir()} == before


def test_stage0_on_real_layout_lists_missing(corpus, tmp_path):
    chime6.transcript_file(corpus, "eval", "S21").unlink()
    shutil.rmtree(corpus / "audio" / "dev")
    r = stage("local/prepare_corpus.py", corpus, tmp_path / "data")
    assert r.returncode == 1
    assert "S21.json: missing transcript" in r.stderr and "S02_P*.wav" in r.stderr and "S09_P*.wav" in r.stderr


def test_unknown_config_key_stops_stage(tmp_path):
    cfg = tmp_path / "x.yaml"
    cfg.write_text("base: " + str(REPO / "recipes/chime6_sim.yaml") + "\nfeatures:\n  mel_bins: 40\n")
    r = subprocess.run([sys.executable, str(REPO / "local/prepare_corpus.py"), "--config", str(cfg)],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1 and "unknown key 'features.mel_bins'" in r.stderr and str(cfg) in r.stderr


def test_fixture_counts_through_lhotse(fixture_corpus, tmp_path):
    """The hand-made real-layout corpus goes through stage 1; counts match what was written."""
    from lhotse import load_manifest

    data = tmp_path / "data"
    counts = make_fixture_corpus(tmp_path / "again")  # same content, to learn the counts
    r = prepare(fixture_corpus, data)
    assert r.returncode == 0, r.stderr[-2000:]
    n = sum(len(load_manifest(data / "manifests" / f"chime6-ihm_cuts_{p}.jsonl.gz")) for p in chime6.PARTS)
    assert n == counts["segments"] - counts["redacted"]
    mdm = load_manifest(data / "manifests" / "chime6-mdm_cuts_eval.jsonl.gz")
    # S01 has no U03 in the real corpus; the fixture's refs are U01/U02 and are found.
    assert {c.id.split("_")[2].split("-")[0] for c in mdm} == {"U01", "U02"}
