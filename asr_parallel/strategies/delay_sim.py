"""A one-process delay simulator: K virtual workers over one flat parameter vector.

The reference the asynchronous strategies are tested against (``tests/test_async.py``): the rules
of ``../shared/ALGORITHMS.md`` (asynchronous section) written as plainly as they read, with no
process, message or optimiser object in between. Every function takes

* ``w0``: the initial parameters (a flat float64 tensor; not modified);
* ``grad(worker, index, w)``: the gradient worker ``worker`` computes for its ``index``-th minibatch
  (0-based) at parameters ``w`` (a flat tensor; the function must not keep or modify ``w``);
* ``lr``: plain SGD on the server (or on every worker), no momentum.

Downpour SGD (Dean et al., NIPS 2012) with ``push_every = fetch_every = 1``: worker k computes its
gradient at the copy it last fetched (version v_k); the server applies gradients in arrival order,
``w <- w - lr * g``, and the worker fetches the new ``w``. The staleness of an update is the server's
version at the update minus v_k; with K equal workers in a fixed round robin it is K - 1 once every
worker has pushed once (0, 1, ..., K - 2 before); in a seeded random order (``seeded_order``) it is
the number of updates since that worker's last push, random. With K = 1 it is SGD.

A push that reaches the server while it has called a pause (an epoch's end, a checkpoint) is applied
after the pause, but the reply to it (the worker's fetch) is sent at once: that worker's next copy is
the parameters of the pause, before any such push. ``late_fetch`` names those pushes (consecutive
indices: one pause).

DC-ASGD (Zheng et al., ICML 2017): the server compensates the delay with the diagonal of the
outer-product approximation of the Hessian, ``g + lambda * g * g * (w - w_bak[k])``, ``w_bak[k]`` the
parameters worker k fetched last; adaptive (DC-ASGD-a): ``lambda / sqrt(MS)``, with the mean square
``MS <- m * MS + (1 - m) * g * g`` updated before use (elementwise). ``lambda = 0`` is ASGD.

Backup workers (Chen, Pan, Monga, Bengio, Jozefowicz 2016): synchronous rounds; in each, the first
K - b gradients to arrive (at the current parameters) are averaged and applied, the rest dropped.
b = 0 is synchronous SGD.

Synchronous-gossip AD-PSGD (Lian et al., ICML 2018): with K a power of 2, at step t worker r
computes its gradient at its own x_r, averages its model with worker r XOR 2^(t mod log2 K), then
subtracts lr times its gradient; the mean over workers then follows mean - lr * mean(g) exactly.
"""

from __future__ import annotations

import math
import random
from typing import Callable

import torch

Grad = Callable[[int, int, torch.Tensor], torch.Tensor]


def round_robin(workers: int, updates: int) -> list[int]:
    """The arrival order 0, 1, ..., K-1, 0, 1, ... of ``updates`` pushes."""
    return [u % workers for u in range(updates)]


def seeded_order(workers: int, updates: int, seed: int = 0) -> list[int]:
    """A seeded random arrival order: each update's worker drawn uniformly (``random.Random(seed)``),
    so the staleness of each update is random; the order ``async_ps``'s ``schedule: seeded`` takes
    while no pause intervenes (during a pause it takes the workers not yet told without a draw)."""
    rng = random.Random(seed)
    return [rng.randrange(workers) for _ in range(updates)]


def downpour(w0: torch.Tensor, grad: Grad, workers: int, order: list[int], lr: float,
             dc_lambda: float = 0.0, adaptive: bool = False, m: float = 0.95, eps: float = 1e-7,
             ratios: list[float] | None = None, late_fetch: frozenset[int] | set[int] = frozenset()):
    """Parameter-server ASGD (and DC-ASGD with ``dc_lambda``), one push per entry of ``order`` (the
    worker whose gradient arrives). Returns (final w, staleness of every update); with ``ratios``
    (a list) DC-ASGD appends ||c|| / ||g|| of every push, c its correction term. The pushes whose
    0-based index in ``order`` is in ``late_fetch`` were deferred by a pause: their worker fetched the
    parameters before the push was applied."""
    w = w0.clone()
    version = 0
    held = [w0.clone() for _ in range(workers)]  # each worker's copy = w_bak[k]
    held_version = [0] * workers
    done = [0] * workers
    mean_square = torch.zeros_like(w0)
    staleness = []
    for u, k in enumerate(order):
        g = grad(k, done[k], held[k].clone())
        done[k] += 1
        staleness.append(version - held_version[k])
        if dc_lambda:
            lam = dc_lambda
            if adaptive:
                mean_square = m * mean_square + (1 - m) * g * g
                lam = dc_lambda / torch.sqrt(mean_square + eps)
            c = lam * g * g * (w - held[k])
            if ratios is not None:
                g_norm = float(g.norm())
                ratios.append(float(c.norm()) / g_norm if g_norm > 0 else 0.0)  # as the trainer's
            g = g + c
        if u in late_fetch and u - 1 not in late_fetch:
            pause, pause_version = w.clone(), version  # the parameters of the pause
        w = w - lr * g
        version += 1
        held[k], held_version[k] = (pause.clone(), pause_version) if u in late_fetch else (w.clone(), version)
    return w, staleness


def backup_rounds(w0: torch.Tensor, grad: Grad, workers: int, rounds: list[list[int]], lr: float,
                  backups: int, weights: Callable[[int, int], float] | None = None):
    """Synchronous SGD with ``backups`` backup workers: ``rounds[r]`` is the order in which the
    workers' gradients of round r arrive; the first K - b are averaged (weighted by ``weights(worker,
    index)``, e.g. utterances, when given) and applied. Returns (final w, workers used per round)."""
    w = w0.clone()
    used_per_round = []
    done = [0] * workers
    for arrival in rounds:
        grads = {k: grad(k, done[k], w.clone()) for k in range(workers)}
        for k in range(workers):
            done[k] += 1
        used = arrival[:workers - backups]
        wts = [weights(k, done[k] - 1) if weights else 1.0 for k in used]
        g = sum(wt * grads[k] for wt, k in zip(wts, used)) / sum(wts)
        w = w - lr * g
        used_per_round.append(list(used))
    return w, used_per_round


def gossip(w0: torch.Tensor, grad: Grad, workers: int, steps: int, lr: float) -> list[torch.Tensor]:
    """Synchronous-gossip AD-PSGD for ``steps`` steps; returns every worker's final parameters."""
    if workers & (workers - 1):
        raise ValueError(f"synchronous gossip needs a power-of-2 number of workers, got {workers}")
    x = [w0.clone() for _ in range(workers)]
    rounds = max(1, int(math.log2(workers)))
    for t in range(steps):
        g = [grad(k, t, x[k].clone()) for k in range(workers)]
        if workers > 1:
            bit = 1 << (t % rounds)
            x = [(x[k] + x[k ^ bit]) / 2 for k in range(workers)]
        x = [x[k] - lr * g[k] for k in range(workers)]
    return x
