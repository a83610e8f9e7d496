"""Launching and faults: the launcher's commands for every case (one process, one node, real nodes
with a c10d or static rendezvous, SLURM, the emulated cluster), overrides with spaces, and injected
faults on 2 gloo ranks of a tiny MLP: a rank killed (SIGKILL) or stopped (SIGSTOP) mid-run, a
corrupt newest checkpoint, a full disk while a checkpoint is written, two run.sh on one directory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from chime6_fixture import TINY_SIMULATION

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.name=mlp", "model.mlp.num_layers=2", "model.mlp.hidden_dim=64", "train.max_steps=8",
        "train.max_duration=20", "train.num_buckets=2", "train.log_every_steps=2", "train.checkpoint_every_steps=3",
        "train.world_size=2"]
STRATEGIES = {"sync_sgd": ["strategy.name=sync_sgd"],
              "bmuf": ["strategy.name=bmuf", "strategy.sync_period=2", "strategy.warmup_steps=2"],
              "pipelined_bp": ["strategy.name=pipelined_bp"],
              # the parameter server (rank 0) and 2 workers in the deterministic round-robin order: its
              # master parameters, optimiser, version and the workers' data positions resume exactly
              "async_ps": ["strategy.name=async_ps", "strategy.schedule=round_robin", "train.world_size=3"],
              # synchronous gossip: seeded pairs, exact
              "ad_psgd": ["strategy.name=ad_psgd", "strategy.gossip=sync"]}
# BMUF whose local warm-up (8 steps) outlasts the first epoch (4 steps): its ranks' models differ then
LOCAL_WARMUP = ["strategy.name=bmuf", "strategy.sync_period=2", "strategy.warmup_steps=8"]


def stage5(data: Path, exp: Path, *extra: str, env: dict | None = None, timeout: float = 300,
           wait: bool = True):
    """run.sh's stage 5 on the tiny corpus (a subprocess; ``wait=False`` gives the Popen)."""
    overrides = " ".join(TINY_SIMULATION + TINY + [f"data_dir={data}", f"exp_dir={exp}", *extra])
    cmd = ["bash", str(REPO / "run.sh"), "--setup", "false", "--stage", "5", "--stop-stage", "5",
           "--overrides", overrides]
    environ = {**os.environ, **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=environ, timeout=timeout)


def final_model(exp: Path) -> dict:
    run = next(exp.glob("mlp_*_w[23]"))
    return torch.load(run / "final.pt", weights_only=True)["model"]


def assert_same_model(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- the launcher


def _cfg(*overrides: str):
    from asr_parallel.config import load_config

    return load_config(REPO / "recipes/chime6_sim.yaml", list(overrides))


def test_launcher_builds_each_case():
    from asr_parallel.bin.launch import build
    from asr_parallel.config import ConfigError

    args = ["--config", "r.yaml"]
    cmd, _ = build(_cfg(), args, {})
    assert cmd[1:] == ["-m", "asr_parallel.bin.train", *args]  # one process: no torchrun
    cmd, _ = build(_cfg("train.world_size=2", "train.max_restarts=2"), args, {})
    assert "--standalone" in cmd and cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert cmd[cmd.index("--max-restarts") + 1] == "2"
    # real nodes, c10d: the same command on every node; node 0 hosts the store when its rank is known
    cmd, _ = build(_cfg("train.world_size=4", "train.nnodes=2", "train.rdzv_endpoint=node0:29500",
                           "train.node_rank=0", "train.rdzv_id=job7"), args, {})
    s = " ".join(cmd)
    assert "--nproc-per-node 2" in s and "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint node0:29500 --rdzv-id job7" in s
    assert "is_host=true" in s and "--standalone" not in s
    # static rendezvous: node rank and master address
    cmd, _ = build(_cfg("train.world_size=4", "train.nnodes=2", "train.rdzv_endpoint=10.0.0.1:29500",
                           "train.rdzv_backend=static", "train.node_rank=1"), args, {})
    assert "--nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --master-port 29500" in " ".join(cmd)
    cmd, warnings = build(_cfg("train.world_size=4", "train.nnodes=2", "train.rdzv_endpoint=10.0.0.1:29500",
                               "train.rdzv_backend=static", "train.node_rank=1", "train.max_restarts=3"), args, {})
    assert cmd[cmd.index("--max-restarts") + 1] == "0" and "cannot restart across nodes" in warnings[0]
    with pytest.raises(ConfigError, match="rendezvous endpoint"):
        build(_cfg("train.world_size=4", "train.nnodes=2"), args, {})
    # SLURM, outside a job step: srun starts this launcher once per node
    env = {"SLURM_JOB_ID": "77", "SLURM_NNODES": "2", "ASR_PARALLEL_SRUN": "srun"}
    cmd, _ = build(_cfg("train.world_size=4"), args, env)  # auto: an allocation of 2 nodes
    assert cmd[:7] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "env",
                       "ASR_PARALLEL_SLURM_STEP=1"]
    assert cmd[-len(args) - 2:-len(args)] == ["-m", "asr_parallel.bin.launch"]
    # a run of one rank, or of ranks that do not divide over the nodes, stays on this node
    assert build(_cfg(), args, env)[0][1:3] == ["-m", "asr_parallel.bin.train"]
    assert "--standalone" in build(_cfg("train.world_size=3"), args, env)[0]
    # in the step on each node: nodes, rank and rendezvous id from SLURM_*, the head from MASTER_ADDR,
    # a port of the job's own
    env.update(ASR_PARALLEL_SLURM_STEP="1", SLURM_PROCID="1", SLURM_NODEID="1", MASTER_ADDR="head")
    cmd, _ = build(_cfg("train.world_size=4", "train.launcher=slurm"), args, env)
    s = " ".join(cmd)
    assert "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint head:29477 --rdzv-id slurm-77" in s
    assert "is_host=false" in s and "--nproc-per-node 2" in s
    # the emulated cluster: emulate_cluster.sh runs the launcher in every node, which then builds
    # the real multi-node command from the node's variables
    cmd, _ = build(_cfg("train.world_size=2", "train.emulate_nodes=2", "train.link_rate=100mbit"), args, {},
                      is_root=True)
    assert cmd[0].endswith("local/emulate_cluster.sh") and "--node-env" in cmd
    node = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.77.0.1", "NODE_ADDR": "10.77.0.2"}
    cmd, _ = build(_cfg("train.world_size=2", "train.emulate_nodes=2"), args, node, node_env=True)
    s = " ".join(cmd)
    assert "--rdzv-endpoint 10.77.0.1:29400" in s and "--local-addr 10.77.0.2" in s and "is_host=false" in s
    _, warnings = build(_cfg("train.world_size=2", "train.emulate_nodes=2"), args, {}, is_root=False)
    assert "needs root" in warnings[0]


def test_launcher_prints_the_command_and_config_checks_nodes(tmp_path):
    r = subprocess.run([str(REPO / "local/launch_train.sh"), "--config", "recipes/chime6_sim.yaml", "--set",
                        "train.world_size=4", "--nnodes", "2", "--rdzv-endpoint", "n0:29400", "--dry-run"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("launch_train: ") and "torchrun" in line and "--rdzv-endpoint n0:29400" in line
    assert "--set train.nnodes=2" in line  # the options reach the training's recorded config
    r = subprocess.run([str(REPO / "local/launch_train.sh"), "--set", "train.world_size=3", "--nnodes", "2",
                        "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "train.nnodes" in r.stderr and "equal numbers of ranks per node" in r.stderr


def test_the_launchers_lines_reach_a_shared_stderr_whole(monkeypatch):
    """The launcher writes its command line (and each warning) in one write, newline included.
    Unbuffered (PYTHONUNBUFFERED=1) stderr is write-through and ``print`` writes the newline
    separately, so the two launchers of an emulated cluster, sharing one pipe, once ran their
    command lines together into a single line (a CI failure of the SLURM test below). One write of
    a line under PIPE_BUF is not interleaved on a pipe. The output code is the one every launch
    path (SLURM, the emulated nodes) shares."""
    import io

    from asr_parallel.bin import launch

    class Recorder(io.StringIO):
        def __init__(self):
            super().__init__()
            self.writes: list[str] = []

        def write(self, s):
            self.writes.append(s)
            return len(s)

    monkeypatch.setattr(sys, "stderr", Recorder())
    monkeypatch.chdir(REPO)
    launch.main(["--config", "recipes/chime6_sim.yaml", "--set", "train.world_size=2", "--set",
                 "train.emulate_nodes=2", "--dry-run"])
    writes = [w for w in sys.stderr.writes if w]
    assert any(w.startswith("launch_train: ") for w in writes)
    assert any(w.startswith("WARNING: launch_train: ") for w in writes) == (os.geteuid() != 0)
    for w in writes:
        assert w.endswith("\n") and w.count("\n") == 1, writes


def test_overrides_with_spaces_and_lists(tmp_path):
    from asr_parallel.config import ConfigError, load_config, split_overrides

    items = split_overrides("decode.lm_weights=[0.5, 1.0]  train.lr=1e-3 compare.seeds=[42, 43] "
                            "train.slow_ranks={1: 2.0} exp_dir='exp/a b'")
    assert items == ["decode.lm_weights=[0.5, 1.0]", "train.lr=1e-3", "compare.seeds=[42, 43]",
                     "train.slow_ranks={1: 2.0}", "exp_dir='exp/a b'"]
    cfg = load_config(REPO / "recipes/chime6_sim.yaml", items)
    assert cfg.decode.lm_weights == [0.5, 1.0] and cfg.train.slow_ranks == {1: 2.0} and cfg.exp_dir == "exp/a b"
    with pytest.raises(ConfigError, match="unbalanced bracket"):
        split_overrides("decode.lm_weights=[0.5, 1.0")
    # run.sh splits the same way (the config's value, read back)
    r = subprocess.run(["bash", str(REPO / "run.sh"), "--setup", "false", "--stage", "9", "--stop-stage", "9",
                        "--overrides", f"decode.lm_weights=[0.5, 1.0] train.lr=0.001 exp_dir={tmp_path}"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------- faults


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory):
    """The experiment directories of uninterrupted runs, per strategy (made when first asked for)."""
    made: dict = {}

    def get(strategy: str) -> Path:
        if strategy not in made:
            exp = tmp_path_factory.mktemp(f"whole_{strategy}")
            r = stage5(prepared, exp, *(STRATEGIES.get(strategy) or LOCAL_WARMUP))
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
            made[strategy] = exp
        return made[strategy]

    return get


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_killed_rank_restarts_the_group_and_ends_as_an_uninterrupted_run(prepared, tmp_path, uninterrupted,
                                                                           strategy):
    """kill -9 of rank 1 after its step 5 (checkpoints every 3 steps and at every epoch's end: 4
    steps per epoch for the data-parallel runs, 9 for the pipeline): torchrun restarts both ranks,
    they agree on the newest checkpoint (step 4, or 3 for the pipeline), resume, and the final
    parameters equal an uninterrupted run's exactly (CPU). The override with a space in a list goes
    through run.sh as one value."""
    r = stage5(prepared, tmp_path / "exp", *STRATEGIES[strategy], "train.max_restarts=1",
               "decode.lm_weights=[0.5, 1.0]", env={"ASR_PARALLEL_FAULT": "kill:1:5"})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert "fault injection: rank 1 at step 5: kill" in out
    assert "launch_train: " in out and "--max-restarts 1" in out  # the command, printed
    if strategy == "async_ps":  # checkpoints by the server's version: 3, then the epoch's end
        assert re.search(r"resuming from \S+/checkpoint-\d{8}: ", out), out[-3000:]
    else:
        newest = 3 if strategy == "pipelined_bp" else 4
        assert re.search(rf"resuming from \S+/checkpoint-{newest:08d}: ", out), out[-3000:]
    assert_same_model(final_model(tmp_path / "exp"), final_model(uninterrupted(strategy)))
    run = next((tmp_path / "exp").glob("mlp_*_w[23]"))
    from asr_parallel.config import load_config

    assert load_config(run / "config.yaml").decode.lm_weights == [0.5, 1.0]


def test_a_stopped_rank_times_out_the_others_and_the_restart_takes_over(prepared, tmp_path, uninterrupted):
    """SIGSTOP of rank 1 after its step 5: rank 0 fails within train.collective_timeout (5 s) with an
    error naming what it waited in (step 6's collectives); torchrun then removes the stopped rank and
    restarts the group, which ends as an uninterrupted run."""
    t0 = time.time()
    r = stage5(prepared, tmp_path / "exp", "strategy.name=sync_sgd", "train.max_restarts=1",
               "train.collective_timeout=5", env={"ASR_PARALLEL_FAULT": "stop:1:5"}, timeout=240)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert "fault injection: rank 1 at step 5: stop" in out
    assert "step 6's collectives (sync_sgd) failed on rank 0" in out, out[-4000:]
    assert "train.collective_timeout (5 s)" in out
    assert re.search(r"timed out.{0,40}5000 ?ms", out, re.IGNORECASE), out[-4000:]  # gloo applied the 5 s
    assert_same_model(final_model(tmp_path / "exp"), final_model(uninterrupted("sync_sgd")))
    print(f"stopped rank: run ended after {time.time() - t0:.0f} s")


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_hogwild_a_dead_or_hung_rank_is_noticed_at_the_next_pause(prepared, tmp_path, fault):
    """Hogwild's ranks send nothing between pauses. Rank 1 killed after its step 5: torchrun's agent
    sees it and restarts the group, which resumes from the checkpoint of the epoch's end (step 4).
    Rank 1 stopped (SIGSTOP) after its step 5: rank 0 trains on alone until the checkpoint of step 6,
    whose barrier fails within train.collective_timeout (5 s) with an error naming the pause; the
    restart then takes over. Both runs end (resume from the shared vector, not exactly: the
    interleaving is the machine's)."""
    t0 = time.time()
    r = stage5(prepared, tmp_path / "exp", "strategy.name=hogwild", "train.max_restarts=1",
               "train.collective_timeout=5", env={"ASR_PARALLEL_FAULT": f"{fault}:1:5"}, timeout=240)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert f"fault injection: rank 1 at step 5: {fault}" in out
    if fault == "stop":
        assert re.search(r"checkpoint at step 6.{0,40} failed on rank 0|step 6's collectives \(hogwild\) failed on rank 0",
                         out), out[-4000:]
        assert "train.collective_timeout (5 s)" in out
    assert re.search(r"resuming from \S+/checkpoint-0000000[46]: ", out), out[-3000:]
    run = next((tmp_path / "exp").glob("mlp_*_w2"))
    assert json.loads((run / "train_summary.json").read_text())["steps"] == 8
    assert not list(Path("/dev/shm").glob("asr_parallel_hogwild_*"))  # no file left behind by the dead rank
    print(f"{fault}: run ended after {time.time() - t0:.0f} s")


def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(prepared, tmp_path, uninterrupted):
    """Killed after step 7 without restarts: checkpoints of steps 3, 4 (the epoch's end) and 6
    remain. Rank 1's file of the newest is truncated; the next run warns, naming the file, resumes
    from step 4 on both ranks and ends as an uninterrupted run."""
    exp = tmp_path / "exp"
    r = stage5(prepared, exp, "strategy.name=sync_sgd", "train.max_restarts=0", env={"ASR_PARALLEL_FAULT": "kill:1:7"})
    assert r.returncode != 0
    run = next(exp.glob("mlp_*_w2"))
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-00000003", "checkpoint-00000004",
                                                                "checkpoint-00000006"]
    bad = run / "checkpoint-00000006" / "rank1.pt"
    bad.write_bytes(bad.read_bytes()[:1000])
    r = stage5(prepared, exp, "strategy.name=sync_sgd", "train.max_restarts=0")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert f"{bad} cannot be read" in out and "falling back to the one before (step 4)" in out, out[-3000:]
    assert "resuming from" in out and "checkpoint-00000004" in out
    set_aside = list(run.glob("checkpoint-00000006.unusable-*"))  # not counted, not tried again
    assert len(set_aside) == 1 and set_aside[0].is_dir()
    assert_same_model(final_model(exp), final_model(uninterrupted("sync_sgd")))


FULL_DISK = r"""
import resource, sys, torch, torch.distributed as dist
from pathlib import Path
from asr_parallel.train import checkpoint as ckpt
exp, rank, port = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
def all_ok(ok):
    t = torch.tensor([1 if ok else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
ckpt.save(exp, 3, rank, 2, {"w": torch.arange(1000.0)}, dist.barrier, keep=3, all_ok=all_ok)
if rank == 1:
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # a file may not grow past 200 kB
try:
    ckpt.save(exp, 6, rank, 2, {"w": torch.zeros(1_000_000)}, dist.barrier, keep=3, all_ok=all_ok)
except ckpt.CheckpointError as e:
    print("ERROR", e, flush=True)
    dist.destroy_process_group()
    sys.exit(3)
"""


def test_a_full_disk_while_writing_a_checkpoint_keeps_the_previous_one_and_stops_every_rank(tmp_path):
    """Rank 1 of 2 cannot write its file (a file-size limit): it raises an error naming the file,
    rank 0 (whose write succeeded) raises too instead of waiting, and the checkpoint before is
    intact and still the newest."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, "-c", FULL_DISK, str(tmp_path), str(rank), port], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [3, 3], outs
    assert f"writing checkpoint {tmp_path}/checkpoint-00000006.tmp/rank1.pt failed" in outs[1][0]
    assert "another rank's write failed" in outs[0][0]
    for out, _ in outs:
        assert f"the newest is {tmp_path}/checkpoint-00000003" in out
    from asr_parallel.train import checkpoint as ckpt

    assert ckpt.latest(tmp_path, 2) == tmp_path / "checkpoint-00000003"
    assert torch.equal(ckpt.load(tmp_path / "checkpoint-00000003", 1)["w"], torch.arange(1000.0))
    assert not list((tmp_path / "checkpoint-00000006.tmp").glob("*rank1*"))  # no half-written file left


def test_a_checkpoint_set_aside_for_its_replacement_is_restored(tmp_path):
    """A process killed between the two renames of a re-save of the same step (the old checkpoint
    moved to ``.old``, the new one not yet in place) loses nothing: the next look for checkpoints puts
    the old one back."""
    from asr_parallel.train import checkpoint as ckpt

    ckpt.save(tmp_path, 4, 0, 1, {"w": torch.ones(3)}, lambda: None, keep=3)
    os.replace(tmp_path / "checkpoint-00000004", tmp_path / "checkpoint-00000004.old")
    assert ckpt.latest(tmp_path, 1) == tmp_path / "checkpoint-00000004"
    assert not (tmp_path / "checkpoint-00000004.old").exists()
    assert torch.equal(ckpt.load(tmp_path / "checkpoint-00000004", 0)["w"], torch.ones(3))
    ckpt.save(tmp_path, 4, 0, 1, {"w": torch.zeros(3)}, lambda: None, keep=3)  # a re-save replaces it
    assert torch.equal(ckpt.load(tmp_path / "checkpoint-00000004", 0)["w"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000004"]


def test_pruning_keeps_the_newest_checkpoints_set_aside_as_unusable(tmp_path):
    """Checkpoints a resume could not read (``*.unusable-<time>``) neither count toward
    ``keep_checkpoints`` nor pile up: a save keeps the ``keep`` most recently set aside, by their time,
    and the ``keep`` newest checkpoints."""
    from asr_parallel.train import checkpoint as ckpt

    for when in (30, 10, 20, 40):  # set aside at these times (not in name order)
        (tmp_path / f"checkpoint-0000000{when // 10}.unusable-{when}").mkdir()
    for step in (1, 2, 3):
        ckpt.save(tmp_path, step, 0, 1, {"w": torch.ones(1)}, lambda: None, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-00000002", "checkpoint-00000003", "checkpoint-00000003.unusable-30",
        "checkpoint-00000004.unusable-40"]


def test_the_slurm_head_node_comes_from_scontrol(tmp_path, monkeypatch):
    """Inside a SLURM step without MASTER_ADDR, node 0 is the first host that ``scontrol show
    hostnames`` gives for the job's node list (a stand-in scontrol here), and the port is the job's."""
    from asr_parallel.bin.launch import build

    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && [ "$3" = "gpu[07-08]" ] && '
                    'printf "gpu07\\ngpu08\\n"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    env = {"SLURM_JOB_ID": "1234", "SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "ASR_PARALLEL_SLURM_STEP": "1"}
    cmd, _ = build(_cfg("train.world_size=2", "train.launcher=slurm"), ["--config", "r.yaml"], env)
    s = " ".join(cmd)
    assert "--rdzv-endpoint gpu07:29634 --rdzv-id slurm-1234" in s and "is_host=true" in s
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in s


def test_a_second_run_sh_on_the_same_directory_stops_with_a_message(prepared, tmp_path):
    exp = tmp_path / "exp"
    first = stage5(prepared, exp, "strategy.name=sync_sgd", wait=False)
    try:
        deadline = time.time() + 60
        while not (exp / ".run.lock.owner").is_file() and time.time() < deadline:
            time.sleep(0.2)
        second = stage5(prepared, exp, "strategy.name=sync_sgd")
        assert second.returncode == 1
        assert f"another run.sh is using {exp}" in second.stderr and f"PID {first.pid}" in second.stderr
    finally:
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert not (exp / ".run.lock.owner").exists()  # the holder's note goes with it
    run = next(exp.glob("mlp_*_w2"))
    assert json.loads((run / "train_summary.json").read_text())["steps"] == 8


@pytest.mark.skipif(os.geteuid() != 0, reason="the emulated cluster needs root (network namespaces)")
def test_two_emulated_nodes_through_the_slurm_path(prepared, tmp_path):
    """The launcher's SLURM path on 2 emulated nodes, with the variables srun would set (faked): each
    node's launcher builds its torchrun from SLURM_NNODES, SLURM_NODEID and SLURM_JOB_ID, node 0's
    address from MASTER_ADDR, and the run trains across the two nodes."""
    import shlex

    overrides = TINY_SIMULATION + TINY + [f"data_dir={prepared}", f"exp_dir={tmp_path / 'exp'}", "strategy.name=sync_sgd"]
    sets = " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    node = ("ASR_PARALLEL_SLURM_STEP=1 SLURM_JOB_ID=4242 SLURM_NNODES=2 SLURM_NODEID=$NODE_RANK SLURM_PROCID=$NODE_RANK "
            f"ASR_PARALLEL_THREADS=1 {sys.executable} -m asr_parallel.bin.launch --launcher slurm --local-addr $NODE_ADDR "
            f"--config recipes/chime6_sim.yaml {sets}")
    r = subprocess.run(["bash", str(REPO / "local/emulate_cluster.sh"), "--nodes", "2", "--rate", "1gbit", "--prefix",
                        "aps", "--", "bash", "-c", node], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    launched = [line for line in r.stderr.splitlines() if line.startswith("launch_train: ")]
    assert len(launched) == 2  # one torchrun per node
    for line in launched:
        assert "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint 10.77.0.1:29642 --rdzv-id slurm-4242" in line
        assert "--nproc-per-node 1" in line
    assert sum("is_host=true" in line for line in launched) == 1
    summary = json.loads((next((tmp_path / "exp").glob("mlp_*_w2")) / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 8


@pytest.mark.skipif(os.geteuid() != 0, reason="the emulated cluster needs root (network namespaces)")
@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_fault_on_one_of_two_emulated_nodes_restarts_both(prepared, tmp_path, uninterrupted, fault):
    """Rank 1 on node 1 of 2 emulated nodes is killed (SIGKILL) or stopped (SIGSTOP) after its step 5.
    Node 0's rank fails (the peer is gone, or the 5 s collective timeout), both nodes' torchrun
    restart their ranks (node 1's for the other's rejoining, which torchrun does not count as a
    restart, so the nodes' restart counts differ: the reason for a fresh store per rendezvous round),
    and the run ends as an uninterrupted one-node run."""
    exp = tmp_path / "exp"
    r = stage5(prepared, exp, "strategy.name=sync_sgd", "train.max_restarts=1", "train.collective_timeout=5",
               "train.emulate_nodes=2", "train.link_rate=1gbit", env={"ASR_PARALLEL_FAULT": f"{fault}:1:5"},
               timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert "emulate_cluster: 2 nodes" in out and f"fault injection: rank 1 at step 5: {fault}" in out
    assert re.search(r"resuming from \S+/checkpoint-00000004: ", out), out[-3000:]
    run = next(exp.glob("mlp_*_w2_2nodes_1gbit"))
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["node_of_rank"] == [0, 1] and summary["steps"] == 8
    whole = torch.load(next(uninterrupted("sync_sgd").glob("mlp_*_w2")) / "final.pt", weights_only=True)["model"]
    assert_same_model(torch.load(run / "final.pt", weights_only=True)["model"], whole)


@pytest.mark.parametrize("strategy", ["sync_sgd", "bmuf_local_warmup"])
def test_sharded_evaluation_equals_one_process(prepared, uninterrupted, strategy):
    """Data-parallel ranks evaluate a shard of dev each and sum the counts: the epoch's greedy WER is
    the one a single process computes on the same model, and the dev loss equal up to rounding. In
    BMUF's local warm-up the ranks' models differ: rank 0 evaluates its own on all of dev."""
    from test_training import make_trainer

    run = next(uninterrupted(strategy).glob("mlp_*_w2"))
    history = json.loads((run / "train_summary.json").read_text())["history"]
    assert history, "no epoch ended within the run"
    trainer = make_trainer(prepared, run.parent / "one_process")
    trainer.model.load_state_dict(torch.load(run / "epoch-1.pt", weights_only=True)["model"])
    one = trainer.evaluate(trainer.model)
    assert history[0]["dev_eval_ranks"] == (2 if strategy == "sync_sgd" else 1)  # sharded, or rank 0 alone
    assert history[0]["dev_wer_greedy"] == pytest.approx(one["dev_wer_greedy"], abs=1e-4)
    assert history[0]["dev_loss"] == pytest.approx(one["dev_loss"], rel=1e-4)


def test_run_sh_on_several_nodes_needs_node_ranks_and_leaves_other_stages_to_node_0(tmp_path):
    base = ["bash", str(REPO / "run.sh"), "--setup", "false", "--nnodes", "2", "--rdzv-endpoint", "n0:29500",
            "--overrides", f"train.world_size=4 exp_dir={tmp_path / 'exp'} data_dir={tmp_path / 'data'}"]
    r = subprocess.run(base + ["--stage", "5", "--stop-stage", "5"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "give every node its --node-rank" in r.stderr
    r = subprocess.run(base + ["--node-rank", "1", "--stage", "5", "--stop-stage", "7"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "node 1 of 2 runs stage 5 only" in r.stderr
    assert not (tmp_path / "exp").exists()  # nothing locked or written before the refusal
