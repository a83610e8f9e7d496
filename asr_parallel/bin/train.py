"""Stage 5: train the acoustic model with the strategy of the recipe config.

Run directly for one process, or under torchrun for several (the recipe does this from
``train.world_size``): ``torchrun --standalone --nproc-per-node 2 -m asr_parallel.bin.train ...``.
gloo on CPU, NCCL on GPU (one GPU per rank). The experiment directory is
``exp_dir/{model}_{strategy and its parameters}_w{world size}``; re-running resumes from its latest
checkpoint, and a finished run is skipped.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from asr_parallel.config import ConfigError, load_config
from asr_parallel.stages import experiment_parser
from asr_parallel.utils.logging import say, setup_logging


def experiment_dir(cfg) -> Path:
    from asr_parallel.strategies import run_name

    name = f"{cfg.model.name}_{run_name(cfg.strategy)}_w{cfg.train.world_size}"
    if cfg.train.emulate_nodes > 1:
        name += f"_{cfg.train.emulate_nodes}nodes_{cfg.train.link_rate.replace(',', '-')}"
        if cfg.train.ranks_per_node:
            name += "_" + "-".join(str(n) for n in cfg.train.ranks_per_node)
    return Path(cfg.exp_dir) / name


def restart_store(rank: int, world: int, timeout) -> dict:
    """Under a torchrun that shares its agents' store with the workers (torchrun's default; the
    launcher turns it off, :func:`asr_parallel.bin.launch.torchrun`), that store seen through a
    prefix of its own per restart (``TORCHELASTIC_RESTART_COUNT``): the store outlives a restart of
    the group, and without the prefix the restarted ranks read the dead ones' addresses from it and
    fail to connect (torch 2.11, ``--max-restarts``). That holds on one node only (the restart count
    is per node), so on several nodes it warns. Otherwise {} (the default env:// initialisation:
    under the launcher's torchrun, a new store on a new port for every rendezvous round)."""
    import torch.distributed as dist

    if "TORCHELASTIC_RESTART_COUNT" not in os.environ or "MASTER_ADDR" not in os.environ:
        return {}
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    if int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1 and rank == 0:
        say("WARNING: torchrun shares its store with the workers on several nodes: after a restart the nodes "
            "may disagree on it; restarts across nodes need the c10d rendezvous with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (local/launch_train.sh sets it; with the static rendezvous it "
            "turns restarts off)")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=False, timeout=timeout, multi_tenant=False)
    prefix = f"asr_parallel/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}"
    return {"store": dist.PrefixStore(prefix, store), "rank": rank, "world_size": world}


def setup_distributed(cfg):
    import torch

    from asr_parallel.strategies.base import DistContext

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world != cfg.train.world_size:
        raise ConfigError(f"train.world_size is {cfg.train.world_size} but {world} process(es) were launched; "
                          "launch with torchrun --nproc-per-node train.world_size (run.sh does)")
    use_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise ConfigError("train.device is cuda but no GPU is visible (CUDA_VISIBLE_DEVICES, the driver); "
                              "set train.device=cpu or auto")
        if local_rank >= gpus and cfg.train.dist_backend != "gloo":
            raise ConfigError(f"local rank {local_rank} has no GPU of its own ({gpus} on this node) and NCCL refuses "
                              "two ranks on one GPU: launch at most one rank per GPU, or set "
                              "train.dist_backend=gloo to let ranks share GPUs")
        index = local_rank % gpus
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
        per_rank = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        torch.set_num_threads(max(1, int(os.environ.get("ASR_PARALLEL_THREADS", per_rank))))
    launched = "TORCHELASTIC_RUN_ID" in os.environ or world > 1  # under torchrun: a process group even for 1
    if launched:
        from datetime import timedelta

        import torch.distributed as dist

        # On GPU, NCCL for CUDA tensors and gloo beside it for CPU tensors (control messages, the
        # pipelines' figures), unless train.dist_backend is gloo; every collective gives up after
        # train.collective_timeout seconds.
        timeout = timedelta(seconds=cfg.train.collective_timeout)
        backend = "cpu:gloo,cuda:nccl" if use_cuda and cfg.train.dist_backend == "auto" else "gloo"
        dist.init_process_group(backend, timeout=timeout, **restart_store(rank, world, timeout))
    from datetime import timedelta

    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, initialized=launched,
                       timeout=timedelta(seconds=cfg.train.collective_timeout) if launched else None)


def settle_bf16_cpu(cfg, exp: Path) -> None:
    """Resolve ``train.bf16_cpu: auto`` to a yes or no before anything fingerprints the config: the
    precision an existing run in ``exp`` was trained in (its ``config.yaml``), so that a run trained
    in float32 before bf16 became the default, or on another CPU, is resumed and reused as it was;
    else what runs here (:func:`asr_parallel.train.step.cpu_bf16_in_effect`: false on GPU ranks, where
    ``train.bf16`` decides). The resolved value is what the trainer writes to ``exp/config.yaml``. Each process resolves it alone: on nodes of different
    CPUs (some without native bf16) set it explicitly, or the ranks train in different precisions."""
    from asr_parallel.train.step import cpu_bf16_in_effect

    if cfg.train.bf16_cpu != "auto":
        return
    recorded = exp / "config.yaml"
    if recorded.is_file():
        import yaml

        try:
            before = ((yaml.safe_load(recorded.read_text()) or {}).get("train") or {}).get("bf16_cpu")
        except yaml.YAMLError as e:
            raise ConfigError(f"{recorded}: not YAML ({e}); it records the run in {exp}: delete that directory "
                              "or train into another one")
        if isinstance(before, bool):
            cfg.train.bf16_cpu = before
            return
    cfg.train.bf16_cpu = cpu_bf16_in_effect(cfg.train)


def main(argv=None, parser=None, make_trainer=None):
    """Stage 5. ``parser`` and ``make_trainer(args, cfg, exp, dist, train_cuts, dev_cuts, sp)`` let a
    variant of the trainer (:mod:`asr_parallel.bin.delay_probe`) run through the same checks."""
    p = parser or experiment_parser(__doc__)
    args = p.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        dist = setup_distributed(cfg)
    except ConfigError as e:
        say(f"ERROR: stage 5 (train): {e}")
        raise SystemExit(1)
    import sentencepiece as spm
    from lhotse import load_manifest, load_manifest_lazy

    from asr_parallel.tokenizer import lang_dir_name
    from asr_parallel.train.checkpoint import CheckpointError
    from asr_parallel.train.trainer import Trainer, TrainingError, training_fingerprint

    exp = Path(args.exp_dir) if args.exp_dir else experiment_dir(cfg)
    data = Path(cfg.data_dir)
    try:
        settle_bf16_cpu(cfg, exp)
        if (exp / "final.pt").is_file() and (exp / "train_summary.json").is_file():
            import json

            done = json.loads((exp / "train_summary.json").read_text()).get("fingerprint")
            if done != training_fingerprint(cfg):  # never report another config's training as this one
                raise TrainingError(f"{exp} holds a finished training of another model, strategy or training "
                                    "config" + ("" if done else " (or from before fingerprints were recorded)")
                                    + f"; delete {exp} or train into another experiment directory")
            if dist.is_main:
                print(f"{exp}: training already finished (final.pt); skipping")
            return
        for path in [data / "fbank/chime6-ihm_cuts_train.jsonl.gz", data / lang_dir_name(cfg.tokenizer) / "bpe.model"]:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing; run the earlier stages first")
        sp = spm.SentencePieceProcessor(model_file=str(data / lang_dir_name(cfg.tokenizer) / "bpe.model"))
        train_path = data / "fbank/chime6-ihm_cuts_train.jsonl.gz"
        train_cuts = load_manifest_lazy(train_path) if cfg.train.lazy_manifests else load_manifest(train_path)
        dev_path = data / "fbank/chime6-ihm_cuts_dev.jsonl.gz"
        dev_cuts = load_manifest(dev_path) if dev_path.is_file() else None
        if make_trainer is not None:
            trainer = make_trainer(args, cfg, exp, dist, train_cuts, dev_cuts, sp)
        else:
            trainer = Trainer(cfg, exp, dist, train_cuts, dev_cuts, sp)
        summary = trainer.fit()
        if dist.is_main:
            print(f"{exp}: {summary['steps']} steps in {summary['wall_seconds'] / 60:.1f} min, "
                  f"{summary['frames_per_second']:.0f} frames/s")
            if dist.world_size > 1:
                predicted = summary["predicted"]["bytes_sent"]
                print(f"communication per rank: {summary['bytes_sent_per_rank'] / 2**20:.1f} MiB sent in "
                      f"{summary['collective_calls']} collective calls (cost model: {predicted / 2**20:.1f} MiB)")
    except (TrainingError, CheckpointError, FileNotFoundError, ValueError) as e:
        if e.__cause__ is not None:  # what the message rewords: its traceback, for the record
            import traceback

            traceback.print_exception(e.__cause__, file=sys.stderr)
        say(f"ERROR: stage 5 (train), rank {dist.rank}: {e}")
        raise SystemExit(1)
    finally:
        if dist.distributed:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()


if __name__ == "__main__":
    main()
