"""The GPU path (run on a lent GPU machine by ``tools/gpu_check.sh``; skipped without CUDA): a
training step of every model waits for the device nowhere, checked by CUDA's synchronisation
debugger (``torch.cuda.set_sync_debug_mode("error")`` raises at any call that makes the host wait:
``.item()``, a device-to-host copy, ``nonzero``...)."""

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "conformer_rotary": ["model.name=conformer", "model.conformer.block=rotary"],
    "conformer_torchaudio": ["model.name=conformer", "model.conformer.block=torchaudio"],
    "tdnn": ["model.name=tdnn"],
    "mlp": ["model.name=mlp"],
}


def _batch(g: torch.Generator, lens: list[int], vocab: int, pin: bool = True):
    from asr_parallel.train.data import Batch

    feats = torch.randn(len(lens), max(lens), 80, generator=g)
    feats = feats.pin_memory() if pin else feats
    tokens = [[int(t) for t in torch.randint(1, vocab, (n // 40,), generator=g)] for n in lens]
    return Batch(feats, torch.tensor(lens), tokens, [""] * len(lens), [f"u{i}" for i in range(len(lens))])


@pytest.mark.parametrize("model", sorted(MODELS))
def test_a_training_step_does_not_wait_for_the_device(model):
    from asr_parallel.config import load_config
    from asr_parallel.models import build_model
    from asr_parallel.strategies.base import DistContext
    from asr_parallel.train.trainer import Trainer

    cfg = load_config(REPO / "recipes/chime6_sim.yaml", MODELS[model] + ["train.device=cuda", "train.bf16=true"])
    torch.manual_seed(0)
    net = build_model(cfg.model, 80, 100).cuda()
    trainer = Trainer.for_benchmark(cfg, DistContext(device=torch.device("cuda")), net)
    g = torch.Generator().manual_seed(0)
    batches = [_batch(g, lens, 100) for lens in ([800, 640, 700], [900, 500], [760, 760, 430, 300])]
    for b in batches:  # warm-up: lazy initialisation (handles, allocator, autotuning) may synchronise
        trainer.train_step(b)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [trainer.train_step(b) for b in batches]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(bool(torch.isfinite(o["loss"])) and not bool(o["bad"]) for o in outs)
    assert outs[0]["frames"] == 2140  # counted on the host


def test_the_loader_pins_batches_for_the_gpu():
    """``loader(..., pin_memory=True)``: every batch arrives in page-locked memory, host lengths kept."""
    from asr_parallel.train.data import loader

    g = torch.Generator().manual_seed(0)
    batches = [_batch(g, [400, 300], 50), _batch(g, [500], 50)]

    class Same(torch.utils.data.Dataset):
        def __getitem__(self, i):
            b = batches[i]
            return type(b)(b.feats.clone(), b.feat_lens, b.tokens, b.texts, b.cut_ids)

    got = list(loader(Same(), [0, 1], 0, pin_memory=True))
    assert all(b.feats.is_pinned() for b in got)
    assert [b.num_frames for b in got] == [700, 500]
    on_gpu = got[0].to(torch.device("cuda"))
    assert on_gpu.feats.is_cuda and on_gpu.num_frames == 700 and not on_gpu.host_lens.is_cuda


OWN_STEP = ["ad_psgd", "gpipe", "one_f_one_b", "pipelined_bp", "synthetic_gradients"]


def own_step_ctc_lengths(strategy: str, device: str, tmp_path, monkeypatch, meta_lengths: bool = False) -> list:
    """Steps of a strategy with its own training step on one rank (a torchrun-like process group,
    ``cpu:gloo,cuda:nccl`` on a GPU), returning the devices of the lengths every CTC call got. With
    ``meta_lengths`` the model's forward pass returns its output lengths on the meta device (no
    values), so a CTC call given the forward pass's lengths instead of the host's fails, on CPU too."""
    import socket

    import torch.distributed as tdist
    import torch.nn.functional as F

    from asr_parallel.bin.train import setup_distributed
    from asr_parallel.config import load_config
    from asr_parallel.models import build_model
    from asr_parallel.train.trainer import Trainer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"TORCHELASTIC_RUN_ID": "gpu-test", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                 "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    cfg = load_config(REPO / "recipes/chime6_sim.yaml",
                      ["model.name=tdnn", f"train.device={device}", f"strategy.name={strategy}",
                       "train.world_size=1", "train.collective_timeout=60"])
    seen = []
    real = F.ctc_loss

    def spy(log_probs, targets, input_lengths, target_lengths, *args, **kwargs):
        seen.append((input_lengths.device.type, target_lengths.device.type))
        return real(log_probs, targets, input_lengths, target_lengths, *args, **kwargs)

    monkeypatch.setattr(F, "ctc_loss", spy)
    dist = setup_distributed(cfg)
    try:
        torch.manual_seed(0)
        net = build_model(cfg.model, 80, 100).to(dist.device)
        if meta_lengths:
            last = net.stages[-1]
            forward = last.forward
            monkeypatch.setattr(last, "forward", lambda x, lengths: (forward(x, lengths)[0], lengths.to("meta")))
        trainer = Trainer.for_benchmark(cfg, dist, net)
        g = torch.Generator().manual_seed(0)
        for lens in ([800, 640, 700], [900, 500], [760, 760, 430, 300]):
            trainer.train_step(_batch(g, lens, 100, pin=device == "cuda"))
        trainer.strategy.end_of_epoch(trainer.ctx)  # pipelines drain
    finally:
        tdist.destroy_process_group()
    return seen


@pytest.mark.parametrize("strategy", OWN_STEP)
def test_strategies_with_their_own_step_give_ctc_lengths_on_the_host(strategy, tmp_path, monkeypatch):
    """ATen's CTC reads its lengths on the host: given on the GPU they cost a copy back that waits
    for it. Strategies that run their own step (gossip, pipelines) pass host lengths too."""
    seen = own_step_ctc_lengths(strategy, "cuda", tmp_path, monkeypatch)
    assert seen and all(devices == ("cpu", "cpu") for devices in seen), seen


def test_the_parameter_server_on_gpu_ranks_equals_the_simulator(tmp_path):
    """async_ps and DC-ASGD with every rank on the GPU (a server and 2 workers sharing it; their
    messages staged through host memory over the strategy's gloo group) in the fixed round robin:
    the master model equals the one-process delay simulator's, as on CPU ranks
    (tests/test_async.py), to float32 rounding."""
    from strategy_harness import gloo_ranks
    from test_async import drive, simulated

    scenarios = {"asgd": {"name": "async_ps", "schedule": "round_robin", "device": "cuda"},
                 "dc": {"name": "dc_asgd", "schedule": "round_robin", "dc_lambda": 2.0, "device": "cuda"}}
    ranks = gloo_ranks(3, drive, scenarios, tmp_path)
    for name, kw in (("asgd", {}), ("dc", {"dc_lambda": 2.0})):
        w, stale = simulated(**kw)
        server = ranks[0][name]
        assert torch.allclose(server["eval"], w, atol=1e-5), (name, (server["eval"] - w).abs().max())
        assert server["summary"]["staleness_max"] == max(stale)
        assert server["comm"]["by_label"] == server["predicted"]["by_label"]
