"""Stage 5's launcher (``local/launch_train.sh``): one command for every way of starting the ranks.

It reads the recipe config, prints the exact command it runs (so it can be copied) and replaces
itself with it:

- **one process**: ``train.world_size`` 1 (``launcher: auto`` or ``local``);
- **one node**: ``torchrun --standalone --nproc-per-node world_size``;
- **several nodes** (``train.nnodes`` N > 1, the same command on every node): torchrun with a c10d
  rendezvous at ``train.rdzv_endpoint`` HOST:PORT (node 0's address) under ``train.rdzv_id``; with
  ``train.rdzv_backend: static`` every node gives ``train.node_rank`` and node 0 is the master at
  the endpoint;
- **SLURM** (``launcher: slurm``, or ``auto`` inside an allocation of more than one node): from the
  batch script, ``srun`` starts this launcher once per node (marked ``ASR_PARALLEL_SLURM_STEP=1``,
  since a batch script has ``SLURM_PROCID`` too); in each of those the
  nodes, node rank and rendezvous id come from ``SLURM_NNODES``, ``SLURM_NODEID`` and
  ``SLURM_JOB_ID``, and the endpoint from ``train.rdzv_endpoint``, else ``MASTER_ADDR``, else the
  first host of ``SLURM_JOB_NODELIST`` (``scontrol show hostnames``), port 29400 + job id mod 1000
  (so that two jobs sharing a node do not meet in one rendezvous): one torchrun per
  node, each starting that node's ranks;
- **the emulated cluster** (``train.emulate_nodes`` N > 1, root only): ``local/emulate_cluster.sh``
  runs this launcher in every emulated node with ``--node-env``, which reads the node's rank and
  addresses from the variables emulate_cluster.sh sets (``NNODES``, ``NODE_RANK``, ``MASTER_ADDR``,
  ``NODE_ADDR``) and then builds the multi-node torchrun command of a real cluster. Each node runs
  ``world_size / N`` ranks, or its entry of ``train.ranks_per_node`` (e.g. ``[2, 1]``); torchrun
  numbers the ranks node by node in the order of the nodes' addresses (its c10d rendezvous sorts
  the participants), which is the emulated nodes' order for up to 9 nodes.

Every torchrun gets ``--max-restarts train.max_restarts``: when a rank dies the whole group is
restarted and resumes from the newest checkpoint that every rank has (:mod:`asr_parallel.train.trainer`).
Command-line options override the config's keys of the same names (``--node-rank`` differs per node).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from asr_parallel.config import ConfigError, add_config_args, load_config
from asr_parallel.utils.logging import say

REPO = Path(__file__).resolve().parents[2]
RDZV_PORT = 29400


def torchrun() -> list[str]:
    """torchrun of this environment (the script beside the interpreter, else the module), with a
    fresh store for every rendezvous round (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``).

    By default torchrun's agents keep one store for the whole job and the workers of every restart
    meet in it again, where the dead workers' gloo addresses still are. A per-restart key prefix
    cannot fix that across nodes: torchrun's restart count is per node, and a node whose workers
    were healthy restarts them for the other node's rejoining without counting it (torch 2.11,
    ``SimpleElasticAgent._invoke_run``), so the nodes would disagree on the prefix. With the store
    not shared, each round's rank 0 serves a new store on a new port, which every node learns from
    that round's rendezvous."""
    exe = Path(sys.executable).parent / "torchrun"
    run = [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    return ["env", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", *run]


def _slurm_head(env: dict) -> str:
    """Node 0's address inside a SLURM step: MASTER_ADDR if set, else the job's first host."""
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ConfigError("launcher slurm: neither train.rdzv_endpoint, MASTER_ADDR nor SLURM_JOB_NODELIST is set; "
                          "give --rdzv-endpoint HOST:PORT")
    if not shutil.which("scontrol"):
        raise ConfigError(f"launcher slurm: 'scontrol' not found to expand SLURM_JOB_NODELIST={nodelist}; "
                          "set MASTER_ADDR or give --rdzv-endpoint HOST:PORT")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def build(cfg, train_args: list[str], env: dict, node_env: bool = False, local_addr: str = "",
          is_root: bool | None = None) -> tuple[list[str], list[str]]:
    """The command that starts this node's ranks, and warnings."""
    tc = cfg.train
    train = ["-m", "asr_parallel.bin.train", *train_args]
    warnings: list[str] = []
    launcher = tc.launcher
    slurm_nodes = int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or 0)
    if launcher == "auto":
        # SLURM only when the run can use the allocation's nodes: more than one rank, as many on each
        # node (a 1-rank run inside a 2-node allocation runs on this node)
        if env.get("SLURM_JOB_ID") and slurm_nodes > 1 and not node_env and tc.nnodes == 1 \
                and tc.world_size > 1 and tc.world_size % slurm_nodes == 0:
            launcher = "slurm"
        elif tc.world_size == 1 and tc.nnodes == 1:
            launcher = "local"
        else:
            launcher = "torchrun"
    if launcher == "local":
        if tc.world_size != 1:
            raise ConfigError(f"launcher local starts one process, but train.world_size is {tc.world_size}")
        return [sys.executable, *train], warnings

    if launcher == "slurm" and env.get("ASR_PARALLEL_SLURM_STEP") != "1":  # not yet in our step: srun one per node
        if not env.get("SLURM_JOB_ID"):
            raise ConfigError("launcher slurm: not inside a SLURM allocation (no SLURM_JOB_ID); use sbatch or salloc")
        if not shutil.which("srun") and not env.get("ASR_PARALLEL_SRUN"):
            raise ConfigError("launcher slurm: 'srun' not found")
        nodes = tc.nnodes if tc.nnodes > 1 else (slurm_nodes or 1)
        srun = shlex.split(env.get("ASR_PARALLEL_SRUN", "srun"))  # tests substitute a stand-in
        # explicit task counts (an sbatch's SLURM_NTASKS would otherwise clash), and the job's cores
        # per task (srun no longer inherits sbatch's --cpus-per-task since Slurm 22.05)
        cpus = [f"--cpus-per-task={env['SLURM_CPUS_PER_TASK']}"] if env.get("SLURM_CPUS_PER_TASK") else []
        return [*srun, f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", *cpus,
                "--kill-on-bad-exit=1", "env",
                "ASR_PARALLEL_SLURM_STEP=1", sys.executable, "-m", "asr_parallel.bin.launch", *train_args], warnings

    nnodes, node_rank, endpoint, rdzv_id = tc.nnodes, tc.node_rank, tc.rdzv_endpoint, tc.rdzv_id
    if launcher == "slurm":  # inside the job step: this node's part
        nnodes = nnodes if nnodes > 1 else (slurm_nodes or nnodes)
        node_rank = int(env.get("SLURM_NODEID", node_rank))
        job = env.get("SLURM_JOB_ID", "")
        rdzv_id = f"slurm-{job}" if job else rdzv_id
        # a port of the job's own, so that two jobs sharing a node do not meet in one rendezvous
        port = RDZV_PORT + (int(job) % 1000 if job.isdigit() else 0)
        endpoint = endpoint or f"{_slurm_head(env)}:{port}"
    elif node_env:  # one node of local/emulate_cluster.sh
        try:
            nnodes, node_rank = int(env["NNODES"]), int(env["NODE_RANK"])
            endpoint, local_addr = f"{env['MASTER_ADDR']}:{RDZV_PORT}", env["NODE_ADDR"]
        except KeyError as e:
            raise ConfigError(f"--node-env: {e.args[0]} is not set (local/emulate_cluster.sh sets it)") from None
    elif tc.emulate_nodes > 1:
        root = os.geteuid() == 0 if is_root is None else is_root
        if not root:
            warnings.append(f"train.emulate_nodes={tc.emulate_nodes} needs root (network namespaces, tc); "
                            "training on one node instead")
        else:
            if tc.world_size % tc.emulate_nodes and not tc.ranks_per_node:
                raise ConfigError(f"train.world_size {tc.world_size} is not a multiple of train.emulate_nodes "
                                  f"{tc.emulate_nodes}: place the ranks with train.ranks_per_node")
            threads = max(1, (os.cpu_count() or 1) // tc.world_size)  # every emulated node shares the cores
            return [str(REPO / "local/emulate_cluster.sh"), "--nodes", str(tc.emulate_nodes), "--rate", tc.link_rate,
                    "--", "env", f"ASR_PARALLEL_THREADS={threads}", sys.executable, "-m", "asr_parallel.bin.launch",
                    "--node-env", *train_args], warnings
    if node_env and tc.ranks_per_node:  # uneven placement on the emulated nodes
        if len(tc.ranks_per_node) != nnodes or not 0 <= node_rank < nnodes:
            raise ConfigError(f"train.ranks_per_node {tc.ranks_per_node} does not fit {nnodes} nodes "
                              f"(this is node {node_rank})")
        per_node = tc.ranks_per_node[node_rank]
    elif tc.world_size % nnodes:
        raise ConfigError(f"train.world_size {tc.world_size} cannot be split evenly over {nnodes} nodes")
    else:
        per_node = tc.world_size // nnodes
    cmd = [*torchrun(), "--nproc-per-node", str(per_node), "--max-restarts", str(tc.max_restarts)]
    if nnodes == 1:
        return [*cmd, "--standalone", *train], warnings
    if not endpoint:
        raise ConfigError(f"train.nnodes is {nnodes}: give the rendezvous endpoint (train.rdzv_endpoint or "
                          "--rdzv-endpoint HOST:PORT, node 0's address)")
    host, port = endpoint.rsplit(":", 1)
    if tc.rdzv_backend == "static" and launcher != "slurm" and not node_env:
        if node_rank < 0:
            raise ConfigError("train.rdzv_backend static needs this node's rank (train.node_rank or --node-rank)")
        if tc.max_restarts > 0:
            # torch 2.11's static rendezvous always shares its store (the restarted ranks would meet the
            # dead ones' addresses) and never tells a healthy node that another restarted (a hung rank's
            # node would wait for ever): restarts across nodes need the c10d rendezvous
            warnings.append(f"train.rdzv_backend static cannot restart across nodes: --max-restarts 0 instead of "
                            f"{tc.max_restarts} (a failed rank ends the run; run stage 5 again to resume from the "
                            "newest checkpoint, or use the c10d rendezvous)")
            cmd[cmd.index("--max-restarts") + 1] = "0"
        cmd += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--master-addr", host, "--master-port", port]
    else:
        cmd += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id]
        if node_rank >= 0:  # node 0 hosts the rendezvous store (torchrun cannot tell when nodes share a hostname)
            cmd += ["--rdzv-conf", f"is_host={'true' if node_rank == 0 else 'false'}"]
    if local_addr:
        cmd += ["--local-addr", local_addr]
    return [*cmd, *train], warnings


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--exp-dir", default=None, help="experiment directory (default: derived from the config)")
    p.add_argument("--launcher", choices=["auto", "local", "torchrun", "slurm"], help="train.launcher")
    p.add_argument("--nnodes", type=int, help="train.nnodes")
    p.add_argument("--node-rank", type=int, help="train.node_rank")
    p.add_argument("--rdzv-endpoint", help="train.rdzv_endpoint (HOST:PORT)")
    p.add_argument("--rdzv-id", help="train.rdzv_id")
    p.add_argument("--max-restarts", type=int, help="train.max_restarts")
    p.add_argument("--local-addr", default="", help="this node's address, if its hostname does not tell")
    p.add_argument("--node-env", action="store_true",
                   help="one node of local/emulate_cluster.sh: nodes and addresses from its variables")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    args = p.parse_args(argv)
    sets = list(args.overrides or [])
    for key in ("launcher", "nnodes", "node_rank", "rdzv_endpoint", "rdzv_id", "max_restarts"):
        value = getattr(args, key)
        if value is not None:
            sets.append(f"train.{key}={value}")
    train_args = ["--config", str(args.config), *[a for kv in sets for a in ("--set", kv)]]
    if args.exp_dir:
        train_args += ["--exp-dir", str(args.exp_dir)]
    try:
        cfg = load_config(args.config, sets)
        cmd, warnings = build(cfg, train_args, dict(os.environ), node_env=args.node_env, local_addr=args.local_addr)
    except ConfigError as e:
        say(f"ERROR: launch_train: {e}")
        raise SystemExit(1)
    for w in warnings:
        say(f"WARNING: launch_train: {w}")
    say(f"launch_train: {shlex.join(cmd)}")
    if args.dry_run:
        return
    os.chdir(REPO)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
