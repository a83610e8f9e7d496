"""Synchronous SGD with DDP on 2 gloo ranks equals one process on the same global batch."""

import torch
import torch.multiprocessing as mp

from asr_parallel.config import load_config

OVERRIDES = ["model.name=mlp", "model.mlp.num_layers=2", "model.mlp.hidden_dim=32", "model.mlp.dropout=0.0"]


def toy_batch():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(4, 60, 80, generator=g)
    lens = torch.tensor([60, 55, 50, 45])
    tokens = [[3, 4, 5], [6, 7], [3, 3, 8], [9]]
    return feats, lens, tokens


def run_steps(model, feats, lens, tokens, steps):
    from asr_parallel.train.loss import ctc_loss

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        logits, out_lens = model(feats, lens)
        loss = ctc_loss(logits, out_lens, tokens) / len(tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()


def build():
    from asr_parallel.models import build_model

    torch.manual_seed(0)
    return build_model(load_config("recipes/chime6_sim.yaml", OVERRIDES).model, 80, 12)


def worker(rank, world, store, out):
    import torch.distributed as dist

    from asr_parallel.strategies import build_strategy
    from asr_parallel.strategies.base import DistContext

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    strategy = build_strategy({"name": "sync_sgd"}, DistContext(rank=rank, world_size=world))
    model = strategy.wrap_model(build())
    feats, lens, tokens = toy_batch()
    share = slice(2 * rank, 2 * rank + 2)
    run_steps(model, feats[share], lens[share], tokens[share], 3)
    if rank == 0:
        torch.save({"params": strategy.eval_model(model).state_dict(), "comm": strategy.comm.state_dict()}, out)
    dist.destroy_process_group()


def test_ddp_two_ranks_equals_single_process(tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    model = build()
    feats, lens, tokens = toy_batch()
    run_steps(model, feats, lens, tokens, 3)
    ddp = torch.load(out, weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.allclose(ddp["params"][k], v, atol=1e-6), k
    # Ring all-reduce accounting: 2 (K-1)/K * P * 4 bytes per step; K = 2, 3 steps.
    params = sum(p.numel() for p in model.parameters())
    assert ddp["comm"]["by_label"]["gradients"] == [3 * params * 4, 3]
    # DDP's own set-up (a shape check and rank 0's broadcast of the model) is counted apart.
    assert ddp["comm"]["by_label"]["ddp_setup"][0] == params * 4
