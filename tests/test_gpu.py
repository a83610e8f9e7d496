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
    "conformer_torchaudio": ["model.name=conformer"],
    "tdnn": ["model.name=tdnn"],
    "mlp": ["model.name=mlp"],
}


def _batch(g: torch.Generator, lens: list[int], vocab: int):
    from asr_parallel.train.data import Batch

    feats = torch.randn(len(lens), max(lens), 80, generator=g)
    tokens = [[int(t) for t in torch.randint(1, vocab, (n // 40,), generator=g)] for n in lens]
    return Batch(feats.pin_memory(), torch.tensor(lens), tokens, [""] * len(lens), [f"u{i}" for i in range(len(lens))])


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
