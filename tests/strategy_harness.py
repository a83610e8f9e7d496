"""Shared by the strategy tests: a toy model and per-rank batches, the project's trainer driven on
them in spawned gloo ranks, and an independent single-process computation of every update rule.

The reference functions restate the rules of ALGORITHMS.md on plain tensors; they import nothing
from :mod:`asr_parallel.strategies`, so a wrong strategy cannot agree with them by construction.
"""

from __future__ import annotations

import copy

import torch

VOCAB = 12
LR = 0.01
# A smooth activation: with ReLU, float rounding in another summation order can flip a unit at its kink
# and change a gradient by far more than rounding (seen: 0.09 from a 5e-7 change of the weights).
MLP = ["model.name=mlp", "model.mlp.num_layers=2", "model.mlp.hidden_dim=32", "model.mlp.dropout=0.0",
       "model.mlp.activation=tanh"]
CONFORMER = ["model.name=conformer", "model.conformer.block=torchaudio", "model.conformer.model_dim=16", "model.conformer.num_layers=1",
             "model.conformer.num_heads=2", "model.conformer.ffn_dim=32", "model.conformer.kernel=3",
             "model.conformer.dropout=0.0"]
CONFORMER_BN = CONFORMER + ["model.conformer.conv_norm=batch"]  # batch-norm buffers in the conv module
CONFORMER_ROTARY = CONFORMER + ["model.conformer.block=rotary"]  # the project's block
SGD = ["train.optimizer=sgd", "train.momentum=0.0", "train.weight_decay=0.0", f"train.lr={LR}",
       "train.scheduler=constant", "train.grad_clip=1e9", "train.spec_augment=false", "train.device=cpu",
       "train.bf16=false"]  # float32 on every device: the references are float32


def config(strategy: dict, model=MLP, train=SGD):
    from asr_parallel.config import load_config

    cfg = load_config("recipes/chime6_sim.yaml", model + train)
    cfg.strategy = dict(strategy)
    return cfg


def build(cfg, seed: int = 0):
    from asr_parallel.models import build_model

    torch.manual_seed(seed)
    return build_model(cfg.model, 80, VOCAB)


def batch(step: int, rank: int, uneven: bool = False):
    """Rank ``rank``'s batch for optimiser step ``step`` (1-based): two or three utterances of its own,
    whose padded length changes from step to step (variable-length speech); with ``uneven`` the ranks
    of a step hold different numbers of utterances."""
    from asr_parallel.train.data import Batch

    g = torch.Generator().manual_seed(1000 * step + rank)
    frames = 40 + 6 * (step % 3)
    utts = 2 + (step + (rank if uneven else 0)) % 2
    feats = torch.randn(utts, frames, 80, generator=g)
    lens = torch.tensor([frames, frames - 7, frames - 3][:utts])
    tokens = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (3, 2, 4)[:utts]]
    ids = [f"s{step}r{rank}u{i}" for i in range(utts)]
    return Batch(feats, lens, tokens, ["x"] * utts, ids)


# ---------------------------------------------------------------- in the spawned ranks


def run_trainer(cfg, dist, steps: int, resume_after: int | None = None, tmp=None, uneven: bool = False) -> dict:
    """Train ``steps`` steps through the project's trainer; with ``resume_after``, save its state after
    that many steps, build a fresh trainer (other initial weights) that loads it, and go on. Records
    after every step the calls the strategy counted and the process groups' own count of calls."""
    from asr_parallel.strategies.base import process_group_calls
    from asr_parallel.train.trainer import Trainer

    trainer = Trainer.for_benchmark(cfg, dist, build(cfg))
    pipeline = trainer.strategy.owns_step  # one data stream for all ranks
    calls = []
    resume_setup = None
    averaged: list = []  # (step, float buffers as the averaging found them, as the step left them)
    watch_buffer_averaging(trainer, averaged)

    def record():
        groups = [None] + list(trainer.strategy.process_groups())
        calls.append((trainer.strategy.comm.calls, process_group_calls(groups)))

    record()
    for s in range(1, steps + 1):
        if resume_after is not None and s == resume_after + 1:
            path = f"{tmp}/state-{dist.rank}.pt"
            torch.save(trainer.state_dict(), path)
            trainer = Trainer.for_benchmark(cfg, dist, build(cfg, seed=99))
            resume_setup = trainer.strategy.comm.state_dict()  # the new process's own start (broadcast)
            trainer.load_state_dict(torch.load(path, weights_only=True))
            watch_buffer_averaging(trainer, averaged)
        n_before = len(averaged)
        trainer.train_step(batch(s, 0 if pipeline else dist.rank, uneven))
        if len(averaged) > n_before:
            averaged[n_before:] = [(s, averaged[n_before][1], _float_buffers(trainer))]
        record()
    trainer.strategy.end_of_epoch(trainer.ctx)
    from asr_parallel.strategies.cost import ModelSize

    st = trainer.strategy
    size = ModelSize.of(trainer.model, trainer.optimizer)
    evaluated = st.eval_model(trainer.wrapped)
    return {"local": copy.deepcopy(trainer.model.state_dict()),
            "eval": copy.deepcopy(evaluated.state_dict()) if evaluated is not None else None,
            "strategy": st.state_dict(), "comm": st.comm.state_dict(), "steps": trainer.step,
            "size": [size.params, size.buffers, size.optimizer_state, size.element_size],
            "delays": list(getattr(st, "delays", [])), "starts": list(getattr(st, "starts", [])),
            "part": sorted(trainer.wrapped.state_dict()) if pipeline else None,
            "predicted": trainer.predicted_comm() if pipeline else None, "calls": calls,
            "resume_setup": resume_setup,
            "optimizer_steps": max((int(s["step"]) for s in trainer.optimizer.state.values() if "step" in s),
                                   default=0),
            "buckets": trainer.strategy.summary_figures().get("ddp_bucket_bytes"), "averaged_buffers": averaged,
            "figures": trainer.strategy.summary_figures(),
            "lr": trainer.optimizer.param_groups[0]["lr"]}


def _float_buffers(trainer) -> list:
    from asr_parallel.strategies.periodic import float_buffers

    return [b.detach().clone() for b in float_buffers(trainer.model)]


def watch_buffer_averaging(trainer, out: list) -> None:
    """Record the float buffers each time the strategy starts averaging them (a periodic strategy's
    synchronisation, the end of a synchronous warm-up; hierarchical's outer strategy, entered before
    its average inside the group), so that a test can check the result is their mean over ranks."""
    st = trainer.strategy
    for obj in (st, getattr(st, "outer", None)):
        if obj is None:
            continue
        for name in ("synchronize", "average_buffers_after_warmup"):
            f = getattr(obj, name, None)
            if f is None:
                continue

            def run(*args, _f=f, **kwargs):
                out.append((None, _float_buffers(trainer), None))
                return _f(*args, **kwargs)

            setattr(obj, name, run)


def spawn_worker(rank, world, store, out, scenarios, tmp):
    import torch.distributed as tdist

    from asr_parallel.strategies.base import DistContext

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    dist = DistContext(rank=rank, world_size=world, initialized=True)
    results = {}
    for name, (strategy, steps, resume_after, model, train, *extra) in scenarios.items():
        results[name] = run_trainer(config(strategy, model, train), dist, steps, resume_after, tmp,
                                    uneven=bool(extra and extra[0] == "uneven"))
    torch.save(results, f"{out}-{rank}.pt")
    tdist.destroy_process_group()


def run_ranks(world: int, scenarios: dict, tmp_path) -> list[dict]:
    """Run every scenario (name -> (strategy, steps, resume_after, model, train)) on ``world`` ranks."""
    import torch.multiprocessing as mp

    out = tmp_path / "results"
    mp.spawn(spawn_worker, args=(world, str(tmp_path / "store"), str(out), scenarios, str(tmp_path)),
             nprocs=world, join=True)
    return [torch.load(f"{out}-{r}.pt", weights_only=True) for r in range(world)]


def _gloo_worker(rank, world, store, out, drive, scenarios):
    import torch.distributed as tdist

    from asr_parallel.strategies.base import DistContext

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    dist = DistContext(rank=rank, world_size=world, initialized=True)
    results = {name: drive(spec, dist) for name, spec in scenarios.items()}
    torch.save(results, f"{out}-{rank}.pt")
    tdist.destroy_process_group()


def spawn_and_reap(fn, args: tuple, nprocs: int, timeout: float = 60) -> None:
    """Start ``fn(rank, *args)`` in ``nprocs`` processes that may die or hang (fault tests): wait up
    to ``timeout`` seconds for each, then kill what is left."""
    import torch.multiprocessing as mp

    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    for p in ctx.processes:
        p.join(timeout)
    for p in ctx.processes:
        if p.is_alive():
            p.kill()


def gloo_ranks(world: int, drive, scenarios: dict, tmp_path) -> list[dict]:
    """``drive(spec, dist)`` for every scenario on ``world`` gloo ranks (one thread each); every rank's
    results (name -> what drive returned)."""
    import torch.multiprocessing as mp

    out = tmp_path / "results"
    mp.spawn(_gloo_worker, args=(world, str(tmp_path / "store"), str(out), drive, scenarios), nprocs=world, join=True)
    return [torch.load(f"{out}-{r}.pt", weights_only=True) for r in range(world)]


# ---------------------------------------------------------------- independent reference


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def load_flat(model, vec: torch.Tensor) -> None:
    i = 0
    for p in model.parameters():
        p.data.copy_(vec[i:i + p.numel()].view_as(p))
        i += p.numel()


def gradient(model, b, denominator: int | None = None) -> torch.Tensor:
    """Gradient of the batch's summed CTC loss divided by ``denominator`` (default: its utterances)."""
    from asr_parallel.train.loss import ctc_loss

    model.zero_grad(set_to_none=True)
    logits, out_lens = model(b.feats, b.feat_lens)
    (ctc_loss(logits, out_lens, b.tokens) / (denominator or len(b.tokens))).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def reference(cfg, workers: list[list[int]], steps: int, rule: str, tau: int = 1, warmup: int = 0,
              eta: float = 0.0, zeta: float = 1.0, nesterov: bool = False, beta: float = 0.9,
              warmup_mode: str = "sync") -> dict:
    """Plain SGD on every worker (a worker's gradient is the mean over its member ranks' batches);
    ``warmup`` steps of gradient averaging over all workers (``warmup_mode`` sync), or of local steps
    after which every worker takes worker 0's model (local_broadcast, fairseq's BMUF warm-up); then
    every ``tau`` steps the ``rule`` (sync, average, bmuf, easgd) across workers, as ALGORITHMS.md
    states it."""
    models = [build(cfg) for _ in workers]
    k = len(workers)
    ref = flat(models[0]).clone()
    delta = torch.zeros_like(ref)
    glob = ref.clone()
    for s in range(1, steps + 1):
        grads = [torch.stack([gradient(m, batch(s, r)) for r in ranks]).mean(0) for m, ranks in zip(models, workers)]
        if rule == "sync" or (s <= warmup and warmup_mode == "sync"):
            grads = [torch.stack(grads).mean(0)] * k
        for m, g in zip(models, grads):
            load_flat(m, flat(m) - LR * g)
        if warmup and s == warmup and warmup_mode == "local_broadcast":
            for m in models[1:]:
                load_flat(m, flat(models[0]))
        if warmup and s == warmup:
            ref = flat(models[0]).clone()
            glob = ref.clone()
        elif rule != "sync" and s > warmup and (s - warmup) % tau == 0:
            xs = [flat(m) for m in models]
            mean = torch.stack(xs).mean(0)
            if rule == "average":
                new = [mean] * k
                glob = mean
            elif rule == "bmuf":
                delta = eta * delta + zeta * (ref - mean)
                glob = ref - delta
                ref = glob - eta * delta if nesterov else glob
                new = [ref] * k
            elif rule == "easgd":
                alpha = beta / k
                new = [x - alpha * (x - glob) for x in xs]
                glob = glob + alpha * sum(x - glob for x in xs)
            for m, v in zip(models, new):
                load_flat(m, v)
    return {"locals": [flat(m) for m in models], "global": glob, "delta": delta, "reference": ref}


def flat_state(state: dict, model_cfg) -> torch.Tensor:
    """Flat parameter vector of a saved state dict, in the model's parameter order."""
    names = [n for n, _ in build(model_cfg).named_parameters()]
    return torch.cat([state[n].reshape(-1) for n in names])


def _two_stages(cfg, start: int):
    """A fresh model (seed 0) cut before stage ``start``: (model, lower stages, upper stages, their
    parameters)."""
    model = build(cfg)
    lower, upper = list(model.stages)[:start], list(model.stages)[start:]
    return (model, lower, upper, [p for s in lower for p in s.parameters()],
            [p for s in upper for p in s.parameters()])


def _run_stages(stages, x, lengths):
    for s in stages:
        x, lengths = s(x, lengths)
    return x, lengths


def torch_optimizer(tc, params):
    """torch's optimiser named by the train section (SGD with its momentum, or Adam/AdamW with beta1 =
    ``momentum``), built with plain torch calls for the pipeline tests' ranks and references alike."""
    if tc.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=tc.lr, betas=(tc.momentum, 0.999), weight_decay=tc.weight_decay)


def reference_pipelined_bp(cfg, steps: int, start: int, stash: bool, locked: bool = False,
                           predict: bool = False, optimizer: bool = False) -> torch.Tensor:
    """Two-stage pipelined back-propagation (Chen et al. 2012) simulated in one process, clock tick by
    clock tick: stage 0 runs the forward pass of minibatch t and then the backward pass of minibatch
    t - 2 (at its weights of now, or with ``stash`` at the weights its forward pass used); stage 1 runs
    forward and backward of minibatch t - 1 and updates at once. With ``locked`` (forward-locked:
    features replay, or DDG with ``stash``) stage 1 takes minibatch t in the same tick and stage 0's
    backward pass is of minibatch t - 1. With ``predict`` (SpecTrain) stage 0's forward and backward
    passes of minibatch n use its weights plus min(D, n) times its last update (D = 2, or 1 locked:
    the delay the gradient will have), taken when the forward pass ran. With ``optimizer`` each stage
    steps its own torch optimiser of ``cfg.train`` (:func:`torch_optimizer`) instead of plain SGD at
    ``LR``, and its last update is the change that step made. Returns the final parameters."""
    from asr_parallel.train.loss import ctc_loss

    model, lower, upper, p0, p1 = _two_stages(cfg, start)
    run = _run_stages
    opt0, opt1 = (torch_optimizer(cfg.train, p0), torch_optimizer(cfg.train, p1)) if optimizer else (None, None)

    def update(params, grads, opt, start_from):
        for p, w, g in zip(params, start_from, grads):
            p.data.copy_(w)
            if opt is None:
                p.data -= LR * g
            else:
                p.grad = g.clone()
        if opt is not None:
            opt.step()
        return [p.detach() - w for p, w in zip(params, start_from)]

    sent, weights_then, grad_in = {}, {}, {}
    upper_lag, lower_lag = (0, 1) if locked else (1, 2)
    last_update = None
    for t in range(steps + lower_lag):
        if t < steps:
            b = batch(t + 1, 0)
            if predict and last_update is not None:
                weights_then[t] = [p.detach() + min(lower_lag, t) * u for p, u in zip(p0, last_update)]
            else:
                weights_then[t] = [p.detach().clone() for p in p0]
            now = [p.detach().clone() for p in p0]
            with torch.no_grad():
                if predict:
                    for p, w in zip(p0, weights_then[t]):
                        p.data.copy_(w)
                sent[t] = run(lower, b.feats, b.feat_lens)
                for p, w in zip(p0, now):
                    p.data.copy_(w)
        n = t - upper_lag
        if 0 <= n < steps:
            y, lengths = sent[n]
            y = y.clone().requires_grad_(True)
            logits, out_lens = run(upper, y, lengths)
            tokens = batch(n + 1, 0).tokens
            grads = torch.autograd.grad(ctc_loss(logits, out_lens, tokens) / len(tokens), p1 + [y])
            grad_in[n] = grads[-1]
            update(p1, grads[:-1], opt1, [p.detach().clone() for p in p1])
        n = t - lower_lag
        if 0 <= n < steps:
            b = batch(n + 1, 0)
            now = [p.detach().clone() for p in p0]
            if stash or predict:
                for p, w in zip(p0, weights_then[n]):
                    p.data.copy_(w)
            y, _ = run(lower, b.feats, b.feat_lens)
            grads = torch.autograd.grad(y, p0, grad_in[n])
            last_update = update(p0, grads, opt0, now)
    return flat(model)


def reference_synthetic_gradients(cfg, steps: int, start: int, synth_lr: float, hidden: int,
                                  conditioned: bool = False) -> torch.Tensor:
    """Two-stage decoupled neural interfaces (Jaderberg et al. 2017) simulated in one process, clock
    tick by clock tick: stage 0 runs the forward pass of minibatch t, back-propagates the synthetic
    gradient M(h) (a per-frame MLP, hidden layer drawn from N(0, 1/fan_in) with generator seed 1000,
    output layer zero; with ``conditioned`` its input also holds the utterance's token counts over
    the target length) and updates; stage 1 runs forward and backward of minibatch t - 1 through the
    CTC loss and updates; then M takes one SGD step on the mean squared error over real frames
    between M(h) and the true gradient of minibatch t - 2. Returns the final parameters."""
    import math

    from asr_parallel.train.loss import ctc_loss

    model, lower, upper, p0, p1 = _two_stages(cfg, start)
    run = _run_stages

    dim = lower[-1].output_dim
    extra = VOCAB if conditioned else 0
    g = torch.Generator().manual_seed(1000)
    w1 = (torch.randn(hidden, dim + extra, generator=g) / math.sqrt(dim + extra)).requires_grad_(True)
    b1 = torch.zeros(hidden, requires_grad=True)
    w2 = torch.zeros(dim, hidden, requires_grad=True)
    b2 = torch.zeros(dim, requires_grad=True)

    def synth(h, mask, cond):
        if cond is not None:
            h = torch.cat([h, cond[:, None, :].expand(-1, h.shape[1], -1)], dim=-1)
        return (torch.relu(h @ w1.T + b1) @ w2.T + b2) * mask[..., None].float()

    def bag(tokens):
        out = torch.zeros(len(tokens), VOCAB)
        for i, t in enumerate(tokens):
            for tok in t:
                out[i, tok] += 1.0 / len(t)
        return out

    kept, true_grad = {}, {}
    for t in range(steps + 2):
        if t < steps:
            b = batch(t + 1, 0)
            h, lens = run(lower, b.feats, b.feat_lens)
            mask = torch.arange(h.shape[1])[None, :] < lens[:, None]
            cond = bag(b.tokens) if conditioned else None
            with torch.no_grad():
                g_hat = synth(h.detach(), mask, cond)
            for p, gr in zip(p0, torch.autograd.grad(h, p0, g_hat)):
                p.data -= LR * gr
            kept[t] = (h.detach(), lens, mask, cond)
        n = t - 1
        if 0 <= n < steps:
            y = kept[n][0].clone().requires_grad_(True)
            logits, out_lens = run(upper, y, kept[n][1])
            tokens = batch(n + 1, 0).tokens
            grads = torch.autograd.grad(ctc_loss(logits, out_lens, tokens) / len(tokens), p1 + [y])
            for p, gr in zip(p1, grads[:-1]):
                p.data -= LR * gr
            true_grad[n] = grads[-1]
        n = t - 2
        if 0 <= n < steps:
            h, _, mask, cond = kept.pop(n)
            mse = ((synth(h, mask, cond) - true_grad.pop(n) * mask[..., None]) ** 2).sum() / (mask.sum() * dim)
            for w, gr in zip((w1, b1, w2, b2), torch.autograd.grad(mse, (w1, b1, w2, b2))):
                w.data -= synth_lr * gr
    return flat(model)


def _stage_grads(stages, params, x, lengths, with_input: bool, n: int, out_grad=None):
    """A stage's forward pass and the gradients of its parameters (and of its input, ``with_input``):
    through the CTC loss of minibatch ``n`` when ``out_grad`` is None (the last stage), else for the
    output gradient ``out_grad(y, output lengths)``. Returns (y, output lengths, gradients)."""
    from asr_parallel.train.loss import ctc_loss

    x_in = x.clone().requires_grad_(with_input)
    y, out_lens = _run_stages(stages, x_in, lengths)
    wrt = params + ([x_in] if with_input else [])
    if out_grad is None:
        tokens = batch(n + 1, 0).tokens
        return y, out_lens, torch.autograd.grad(ctc_loss(y, out_lens, tokens) / len(tokens), wrt)
    return y, out_lens, torch.autograd.grad(y, wrt, out_grad(y, out_lens))


def _parts(model, starts: list[int]) -> list[list]:
    bounds = list(starts) + [len(model.stages)]
    return [list(model.stages)[bounds[i]:bounds[i + 1]] for i in range(len(starts))]


def reference_forward_locked(cfg, steps: int, starts: list[int], stash: bool) -> torch.Tensor:
    """Forward-locked pipelined back-propagation on S stages in one process (features replay, or DDG
    with ``stash``): at tick t the forward pass of minibatch t runs through every stage at the weights
    of the moment; stage S-1 back-propagates minibatch t, stage s < S-1 minibatch t - (S-1-s) with the
    input gradient stage s + 1 computed at tick t - 1, recomputing its forward pass at its current
    weights (or at those its forward pass used); then every stage updates. Final parameters."""

    model = build(cfg)
    parts = _parts(model, starts)
    S = len(parts)
    params = [[p for st in part for p in st.parameters()] for part in parts]
    inputs: dict = {}  # (stage, minibatch) -> (input, lengths, weights of the forward pass)
    grad_out: dict = {}  # (stage, minibatch) -> gradient of the stage's output
    for t in range(steps + S - 1):
        if t < steps:
            b = batch(t + 1, 0)
            x, lengths = b.feats, b.feat_lens
            for s, part in enumerate(parts):
                inputs[(s, t)] = (x, lengths, [p.detach().clone() for p in params[s]])
                with torch.no_grad():
                    x, lengths = _run_stages(part, x, lengths)
        updates = []
        for s in reversed(range(S)):
            n = t - (S - 1 - s)
            if not 0 <= n < steps:
                continue
            x, lengths, then = inputs.pop((s, n))
            now = [p.detach().clone() for p in params[s]]
            if stash:
                for p, w in zip(params[s], then):
                    p.data.copy_(w)
            _, _, grads = _stage_grads(parts[s], params[s], x, lengths, s > 0, n,
                                       None if s == S - 1 else lambda y, lens: grad_out.pop((s, n)))
            if s > 0:
                grad_out[(s - 1, n)] = grads[-1]
            for p, w in zip(params[s], now):
                p.data.copy_(w)
            updates.append((params[s], grads[:len(params[s])]))
        for ps, gs in updates:
            for p, g in zip(ps, gs):
                p.data -= LR * g
    return flat(model)


def reference_synthetic_gradients_stack(cfg, steps: int, starts: list[int], synth_lr: float,
                                        hidden: int) -> torch.Tensor:
    """Decoupled neural interfaces on S stages in one process: at tick t stage s runs minibatch t - s
    (its input the output stage s - 1 made at tick t - 1), back-propagates its synthesiser's
    prediction (the last stage: the CTC loss) through itself and updates; the gradient of its input
    is the target of stage s - 1's synthesiser (bootstrapped below S-2); then stage s's synthesiser
    (hidden layer from N(0, 1/fan_in) with generator seed 1000 + s, output layer zero) takes one SGD
    step on the mean squared error over real frames for minibatch t - s - 2. Final parameters."""
    import math


    model = build(cfg)
    parts = _parts(model, starts)
    S = len(parts)
    params = [[p for st in part for p in st.parameters()] for part in parts]
    synths = []
    for s in range(S - 1):
        dim = parts[s][-1].output_dim
        g = torch.Generator().manual_seed(1000 + s)
        synths.append([(torch.randn(hidden, dim, generator=g) / math.sqrt(dim)).requires_grad_(True),
                       torch.zeros(hidden, requires_grad=True), torch.zeros(dim, hidden, requires_grad=True),
                       torch.zeros(dim, requires_grad=True)])

    def synth(s, h, mask):
        w1, b1, w2, b2 = synths[s]
        return (torch.relu(h @ w1.T + b1) @ w2.T + b2) * mask[..., None].float()

    outputs: dict = {}  # (stage, minibatch) -> (output, lengths), kept for the stage above and the synthesiser
    targets: dict = {}  # (stage, minibatch) -> gradient of that stage's output from the stage above
    for t in range(steps + S):
        made, updates, trains = {}, [], []
        for s in range(S):
            n = t - s
            if 0 <= n < steps:
                if s == 0:
                    b = batch(n + 1, 0)
                    x, lengths = b.feats, b.feat_lens
                else:
                    x, lengths = outputs[(s - 1, n)]
                def predicted(y, out_lens, s=s):
                    with torch.no_grad():
                        return synth(s, y.detach(), torch.arange(y.shape[1])[None, :] < out_lens[:, None])

                y, out_lens, grads = _stage_grads(parts[s], params[s], x, lengths, s > 0, n,
                                                  None if s == S - 1 else predicted)
                if s < S - 1:
                    made[(s, n)] = (y.detach(), out_lens)
                if s > 0:
                    targets[(s - 1, n)] = grads[-1]
                updates.append((params[s], grads[:len(params[s])]))
            m = t - s - 2
            if s < S - 1 and 0 <= m < steps:
                trains.append((s, m))
        for s, m in trains:  # the targets the stages above made at tick t - 1
            h, lens = outputs.pop((s, m))
            mask = torch.arange(h.shape[1])[None, :] < lens[:, None]
            target = targets.pop((s, m))
            mse = ((synth(s, h, mask) - target * mask[..., None]) ** 2).sum() / (mask.sum() * h.shape[2])
            for w, gr in zip(synths[s], torch.autograd.grad(mse, synths[s])):
                w.data -= synth_lr * gr
        for ps, gs in updates:
            for p, g in zip(ps, gs):
                p.data -= LR * g
        outputs.update(made)
    return flat(model)
