"""The emulated cluster (local/emulate_cluster.sh): network namespaces joined through a bridge with
tc-limited links. Needs root; skipped otherwise (the recipe then trains on one node and says so)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and tc need root")

TRANSFER = textwrap.dedent("""
    import os, sys, time, torch, torch.distributed as dist
    rank = int(os.environ["NODE_RANK"])
    dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:29556", rank=rank,
                            world_size=int(os.environ["NNODES"]))
    t = torch.zeros(int(sys.argv[1]) // 4)
    dist.barrier()
    t0 = time.time()
    if rank == 0:
        dist.send(t, 1)
    else:
        dist.recv(t, 0)
    dist.barrier()
    if rank == 1:
        print(f"seconds {time.time() - t0:.3f} address {os.environ['NODE_ADDR']}")
    dist.destroy_process_group()
""")


def test_transfer_runs_at_the_link_rate(tmp_path):
    """4 MB between two emulated nodes over a 20 Mbit/s link: no faster than the rate allows, and at
    least 70% of it (TCP/IP headers cost about 5%, tbf's bucket a little)."""
    script = tmp_path / "transfer.py"
    script.write_text(TRANSFER)
    nbytes, rate = 4_000_000, 20e6  # 20 Mbit/s: at least 1.6 s
    r = subprocess.run(["bash", str(REPO / "local/emulate_cluster.sh"), "--nodes", "2", "--rate", "20mbit",
                        "--prefix", "apt", "--", sys.executable, str(script), str(nbytes)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    seconds = float(r.stdout.split("seconds ")[1].split()[0])
    assert "address 10.77.0.2" in r.stdout
    assert nbytes * 8 / rate * 0.95 <= seconds <= nbytes * 8 / rate / 0.7, seconds
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "apt-br" not in links and "apt0h" not in links  # removed on exit
    assert "apt0" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_one_rate_per_node_makes_a_slow_node(tmp_path):
    """--rate 20mbit,10mbit: node 0's link is limited to 20 Mbit/s, node 1's to 10 Mbit/s (read back from
    tc in each namespace); a list of the wrong length is refused."""
    show = "echo node $NODE_RANK $(tc qdisc show dev eth0)"
    r = subprocess.run(["bash", str(REPO / "local/emulate_cluster.sh"), "--nodes", "2", "--rate", "20mbit,10mbit",
                        "--prefix", "apr", "--", "bash", "-c", show], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = {line.split()[1]: line for line in r.stdout.splitlines() if line.startswith("node ")}
    assert "rate 20Mbit" in lines["0"] and "rate 10Mbit" in lines["1"], r.stdout
    r = subprocess.run(["bash", str(REPO / "local/emulate_cluster.sh"), "--nodes", "2", "--rate", "1mbit,2mbit,3mbit",
                        "--prefix", "apr", "--", "true"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "give one rate, or one per node (2)" in r.stderr


def test_a_second_run_on_the_same_cluster_waits_for_the_first():
    """Two runs with one cluster name would delete each other's namespaces: the second waits, saying
    so, until the first has ended (here: until the test releases the lock it holds)."""
    import fcntl
    import time

    with open("/tmp/emulate_cluster-apl.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        p = subprocess.Popen(["bash", str(REPO / "local/emulate_cluster.sh"), "--nodes", "2", "--prefix", "apl",
                              "--", "true"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2)
        assert p.poll() is None  # still waiting
        fcntl.flock(held, fcntl.LOCK_UN)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err[-2000:]
    assert "another run holds the emulated cluster 'apl'" in err and "emulate_cluster: 2 nodes" in err


@pytest.mark.parametrize("strategy", ["sync_sgd", "model_averaging"])
def test_bytes_on_the_wire_match_the_modelled_bytes(prepared, tmp_path, strategy):
    """Two emulated nodes: the bytes the link's counters saw (headers, acknowledgements and torchrun's
    own traffic included) are at least the bytes modelled for every counted call and within 15% above
    them, and every call
    the ranks made (the trainer's own included) is counted."""
    from test_recipe_end_to_end import run_sh

    r = run_sh(prepared, tmp_path / "exp", "train.world_size=2", "train.emulate_nodes=2", "train.link_rate=200mbit",
               f"strategy.name={strategy}", *(["strategy.sync_period=2"] if strategy == "model_averaging" else []),
               "model.mlp.hidden_dim=512", stop_stage=5)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "emulate_cluster: 2 nodes" in r.stderr
    import json

    run = next((tmp_path / "exp").glob(f"mlp_{strategy}*_w2_2nodes_200mbit"))
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 8
    assert summary["nodes"] == 2 and summary["link_rate"] == "200mbit"  # as the scaling validation reads them
    wire, modelled = summary["wire"]["bytes_sent_per_rank"][0], summary["bytes_sent_per_rank"]
    print(strategy, "wire", summary["wire"], "modelled", modelled, summary["bytes_by_label"])
    assert modelled > 4_000_000  # the training traffic dominates: parameters or gradients of 0.5 M values
    # headers and acknowledgements only add to what the counted calls carry; 15% bounds them
    assert modelled <= wire <= 1.15 * modelled, (wire, modelled)
    # The trainer's own calls, exactly: the agreement on a checkpoint to resume from (none here: one
    # all-reduce), the epoch length at start-up and at every epoch begun, 3 per checkpoint (2 barriers
    # and the all-reduce that tells whether every rank's write succeeded), the sharded evaluation's
    # sums and 1 barrier after every epoch's evaluation, the checkpoint at max_steps, and the final
    # figures (peak memory, then the gathered wire bytes and call counts).
    epochs = summary["epochs"]  # finished; the run stopped by max_steps inside the next one
    assert summary["bytes_by_label"]["trainer"][1] == 1 + 1 + (epochs + 1) + 5 * epochs + 3 + 2
    calls = summary["calls_this_process"]
    assert calls["counted"] == calls["process_group"], calls


@pytest.mark.parametrize("compression", ["onebit", "powersgd", "bf16", "fp16"])
def test_compressed_gradients_on_the_wire(prepared, tmp_path, compression):
    """Compressed synchronous SGD on two emulated nodes: the link's counters see at least the bytes
    modelled for every counted call (1-bit SGD's all-to-all and all-gather of packed signs, PowerSGD's
    three all-reduces, the half-precision buckets' all-reduce) and at most 15% more; and the
    compressed steps send a small part of what plain steps send (half for bf16 and fp16)."""
    from test_recipe_end_to_end import run_sh

    r = run_sh(prepared, tmp_path / "exp", "train.world_size=2", "train.emulate_nodes=2", "train.link_rate=200mbit",
               "strategy.name=sync_sgd", f"strategy.compression={compression}", "strategy.powersgd_rank=4",
               "model.mlp.hidden_dim=512", stop_stage=5)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    import json

    run = next((tmp_path / "exp").glob("mlp_sync_sgd_compression*_w2_2nodes_200mbit"))
    summary = json.loads((run / "train_summary.json").read_text())
    wire, modelled = summary["wire"]["bytes_sent_per_rank"][0], summary["bytes_sent_per_rank"]
    print(compression, "wire", summary["wire"], "modelled", modelled, summary["bytes_by_label"])
    assert modelled <= wire <= 1.15 * modelled, (wire, modelled)
    assert summary["bytes_by_label"]["gradients"] == summary["predicted"]["by_label"]["gradients"]
    steps, plain_steps = summary["steps"], 2  # strategy.start_step
    params = summary["params"]
    per_plain_step = 4 * (params + 2)  # 2 ranks: a ring all-reduce sends the bucket once
    compressed = summary["bytes_by_label"]["gradients"][0] - plain_steps * per_plain_step
    if compression in ("bf16", "fp16"):  # 2 bytes a value instead of 4 (bucket boundaries add a few bytes)
        assert compressed / (steps - plain_steps) == pytest.approx(per_plain_step / 2, rel=1e-4), \
            (compressed, per_plain_step)
    else:
        assert 0 < compressed / (steps - plain_steps) < 0.25 * per_plain_step, (compressed, per_plain_step)
    calls = summary["calls_this_process"]
    assert calls["counted"] == calls["process_group"], calls


def test_uneven_placement_puts_the_server_and_one_worker_on_node_0(prepared, tmp_path):
    """``train.ranks_per_node: [2, 1]``: the parameter server (rank 0) and worker 0 (rank 1) run on node
    0, worker 1 (rank 2) alone on node 1 (torchrun's ranks read back per rank); the server's sends
    to the worker beside it stay off the link, so node 0's link carries less than all it sent. Worker 1
    is a straggler (``train.slow_ranks``): only it sleeps, by its training thread's CPU clock."""
    from test_recipe_end_to_end import run_sh

    r = run_sh(prepared, tmp_path / "exp", "train.world_size=3", "train.emulate_nodes=2", "train.link_rate=200mbit",
               "train.ranks_per_node=[2, 1]", "strategy.name=async_ps", "model.mlp.hidden_dim=512",
               "train.slow_ranks={2: 2.0}", stop_stage=5)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "--nproc-per-node 2" in r.stderr and "--nproc-per-node 1" in r.stderr
    import json

    run = next((tmp_path / "exp").glob("mlp_async_ps*_w3_2nodes_200mbit_2-1"))
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["nodes"] == 2 and summary["node_of_rank"] == [0, 0, 1]
    slept = summary["slow_seconds_per_rank"]
    assert slept[0] == slept[1] == 0 and slept[2] > 0, slept
    assert summary["slow_basis"] == "training thread CPU time" and summary["slow_ranks"] == {"2": 2.0}
    server_sent, wire = summary["bytes_sent_per_rank"], summary["wire"]["bytes_sent_per_rank"]
    pushes = summary["strategy_figures"]["pushes_per_worker"]
    assert min(pushes) > 0, pushes  # both workers trained
    assert server_sent > 4_000_000 and wire[2] > 0
    assert wire[0] < 0.85 * server_sent, (wire, server_sent)

