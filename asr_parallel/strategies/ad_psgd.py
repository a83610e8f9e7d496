"""``ad_psgd``: asynchronous decentralized parallel SGD.

Lian, Zhang, Zhang, Liu, "Asynchronous decentralized parallel stochastic gradient descent" (ICML
2018). No server: every worker i keeps its own model x_i and, for each minibatch,

    x_hat = x_i;  g = grad f(x_hat; minibatch);          (the gradient at a snapshot)
    x_i, x_j <- (x_i + x_j) / 2  with one neighbour j,  atomically (both take the average);
    x_i <- x_i - lr * g                                 (the recipe's optimiser, its state local)

Pairwise averaging keeps the sum of the models, so their mean moves by the mean of the applied
updates; no step waits for all workers. Deadlock-free pairing follows the paper's bipartite split:
even ranks are active (they pick a peer at random, seeded, among the odd ranks and initiate the
average), odd ranks are passive (a thread of their own answers requests as they come, while the
main thread computes; a lock makes each average and each optimiser step atomic). With one rank it
is SGD. With an odd K there is one active rank more than passive ones (K = 3: ranks 0 and 2 both
average with rank 1), so the passive ranks take part in more averages than the active ones; the
pairing stays bipartite, as the paper's deadlock-free scheme needs.

``gossip: sync`` is the deterministic variant for tests and exact comparison: with K a power of 2,
at step t every rank r averages with r XOR 2^(t mod log2 K) (both send, both average), then
applies its gradient (computed at its model before the average); the mean over ranks then follows
SGD on the mean gradient exactly (:func:`asr_parallel.strategies.delay_sim.gossip`).

Traffic per exchange: P * b bytes each way between the two ranks of a pair, plus a small header
from the active one, whatever K (label ``gossip``). Point-to-point gloo calls in a group of their own,
on host memory: on GPU ranks the flat model is copied to the CPU to be sent and the peer's back to
the GPU (2 P * b bytes each way over PCIe per exchange; not yet run on a GPU).
Evaluation and the saved epoch models: the average of all ranks' models (one all-reduce at each
epoch's end, label ``eval``); each rank checkpoints its own model. The trainer's epoch ends are
common pauses (checkpoint, evaluation), as for the other strategies; between them no rank waits for
all. A passive rank whose active peers have all been silent for ``timeout`` seconds while it still
expects them stops with an error naming the silent rank; with several active peers (K >= 3), one
silent for longer than both ``timeout`` and ``train.collective_timeout`` while another still sends
stops it too, named. A fast rank waiting at an epoch's end for a slow one is silent meanwhile: that
wait, the evaluation and a step together must stay below the limit (each alone does, or its
barrier would time out first).
"""

from __future__ import annotations

import copy
import datetime
import math
import random
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from asr_parallel.strategies.base import CommCounter, Strategy, all_reduce
from asr_parallel.strategies.periodic import flatten, unflatten_into

TAG_REQUEST, TAG_MODEL, TAG_REPLY, TAG_SYNC = 21, 22, 23, 24
EXCHANGE, DONE = 1.0, 2.0


class ADPSGD(Strategy):
    name = "ad_psgd"
    owns_step = True

    @dataclass
    class Params:
        gossip: Literal["async", "sync"] = "async"  # async: bipartite active/passive; sync: seeded XOR pairing
        seed: int = 0  # the active ranks' choice of peers
        timeout: float = 300.0  # seconds a rank waits for its peer before stopping with an error

        def __post_init__(self):
            if self.timeout <= 0:
                raise ValueError(f"strategy.timeout must be > 0, got {self.timeout}")

    def __init__(self, params, dist):
        super().__init__(params, dist)
        k = dist.world_size
        if params.gossip == "sync" and k & (k - 1):
            raise ValueError(f"strategy ad_psgd with gossip: sync needs a power-of-2 number of ranks, got {k}")
        self.active = dist.rank % 2 == 0
        self.passives = [r for r in range(k) if r % 2 == 1]
        self.actives = [r for r in range(k) if r % 2 == 0]
        self.rng = random.Random(params.seed * 1000 + dist.rank)
        self.timeout = datetime.timedelta(seconds=params.timeout)
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.thread_comm = CommCounter()  # the passive thread's calls, merged at the end
        self.thread_error: str | None = None
        self.exchanges = 0  # averages this rank took part in
        self.served = 0  # (passive) requests answered
        self.steps = 0
        self.evals = 0
        self.done_sent = 0
        self.group = None

    def process_groups(self) -> list:
        return [self.group] if self.group is not None else []

    def wrap_model(self, model: nn.Module) -> nn.Module:
        import torch.distributed as tdist

        self.model = model  # x_i: what the optimiser updates and the peers average with
        self.params_list = list(model.parameters())
        if self.dist.world_size > 1:
            self.group = tdist.new_group(backend="gloo", timeout=self.dist.timeout)
        if self.params.gossip == "async" and self.dist.world_size > 1:
            self.compute = copy.deepcopy(model)  # x_hat: the snapshot the gradient is computed at
            # a passive rank's serving thread starts with its first step, after any resume has loaded
            # the model (no average may touch it while the checkpoint is read in)
            self.serving = not self.active
        else:
            self.compute = model
        return model

    def state_lock(self):
        """Held while the trainer reads the state to save (a passive thread may average meanwhile)."""
        return self.lock if getattr(self, "serving", False) else nullcontext()

    # -- one step
    def train_step(self, batch, ctx) -> dict:
        from asr_parallel.train.loss import ctc_loss, host_output_lengths

        if self.thread_error:
            raise RuntimeError(self.thread_error)
        if getattr(self, "serving", False) and self.thread is None:
            self.thread = threading.Thread(target=self._serve, name="ad_psgd-passive", daemon=True)
            self.thread.start()
        self.steps += 1
        batch = batch.to(ctx.device)
        n = len(batch.tokens)
        net = self.compute
        if net is not self.model:
            with self.lock:  # x_hat = x_i
                for c, p in zip(net.parameters(), self.params_list):
                    c.data.copy_(p.data)
        net.train()
        ctx.optimizer.zero_grad(set_to_none=True)
        for c in net.parameters():
            c.grad = None
        with ctx.autocast():
            logits, out_lens = net(ctx.augment(batch.feats), batch.feat_lens)
        loss_sum = ctc_loss(logits, host_output_lengths(net, out_lens, batch.lens_on_host), batch.tokens)
        (loss_sum / n).backward()
        grad_norm = ctx.clip_local(net.parameters())
        loss = loss_sum.detach() / n
        bad = ctx.bad_flag(loss, grad_norm)
        if self.dist.world_size > 1:
            if self.params.gossip == "sync":
                self._sync_average(self.steps - 1)
            elif self.active:
                self._exchange(self.rng.choice(self.passives))
        with self.lock if self.thread is not None else nullcontext():
            if net is not self.model:
                for c, p in zip(net.parameters(), self.params_list):
                    p.grad = c.grad
            ctx.apply(bad)
        ctx.advance()
        return {"bad": bad, "loss": loss, "grad_norm": grad_norm.detach(), "frames": batch.num_frames,
                "cut_ids": batch.cut_ids}

    def _send(self, t, dst, tag, comm):
        import torch.distributed as tdist

        comm.add(t.numel() * t.element_size(), 1, "gossip")
        return tdist.isend(t, dst, group=self.group, tag=tag)

    def _recv(self, t, src, tag, comm, what):
        import torch.distributed as tdist

        work = tdist.irecv(t, src, group=self.group, tag=tag)
        try:
            work.wait(timeout=self.timeout)
        except RuntimeError as e:
            who = "any active rank" if src is None else f"rank {src}"
            raise RuntimeError(f"ad_psgd rank {self.dist.rank}: no {what} from {who} within "
                               f"{self.params.timeout:.0f} s, or the connection broke; has it died or hung? ({e})") from e
        comm.add(0, 1, "gossip")
        comm.bytes_received += t.numel() * t.element_size()
        return work._source_rank() if src is None else src

    def _sync_average(self, t: int) -> None:
        """Synchronous gossip: average with rank r XOR 2^(t mod log2 K)."""
        k = self.dist.world_size
        peer = self.dist.rank ^ (1 << (t % max(1, int(math.log2(k)))))
        mine = flatten(self.params_list)
        host = mine.cpu()  # gloo's point-to-point calls move host memory: GPU models go through the CPU
        theirs = torch.empty_like(host)
        send = self._send(host, peer, TAG_SYNC, self.comm)
        self._recv(theirs, peer, TAG_SYNC, self.comm, "model")
        send.wait()
        unflatten_into((mine + theirs.to(mine.device)) / 2, self.params_list)
        self.exchanges += 1

    def _exchange(self, peer: int) -> None:
        """An active rank: average atomically with passive ``peer`` (it answers with its model and
        takes the average too)."""
        header = torch.tensor([EXCHANGE, self.steps], dtype=torch.float64)
        mine = flatten(self.params_list)
        host = mine.cpu()
        sends = [self._send(header, peer, TAG_REQUEST, self.comm), self._send(host, peer, TAG_MODEL, self.comm)]
        theirs = torch.empty_like(host)
        self._recv(theirs, peer, TAG_REPLY, self.comm, "model")
        for w in sends:
            w.wait()
        unflatten_into((mine + theirs.to(mine.device)) / 2, self.params_list)
        self.exchanges += 1

    def _serve(self) -> None:
        """A passive rank's thread: answer every active rank's request until all have said they are done."""
        done = set()
        last = {a: time.time() for a in self.actives}
        collective = self.dist.timeout.total_seconds() if self.dist.timeout else 0.0
        limit = max(self.params.timeout, collective)
        try:
            while len(done) < len(self.actives):
                header = torch.zeros(2, dtype=torch.float64)
                src = self._recv(header, None, TAG_REQUEST, self.thread_comm, "request")
                now = last[src] = time.time()
                silent = [a for a in self.actives if a not in done and now - last[a] > limit]
                if silent:  # another active rank still sends: this one died or hung
                    a = min(silent, key=lambda r: last[r])
                    self.thread_error = (f"ad_psgd rank {self.dist.rank} (passive): rank {a} sent nothing for "
                                         f"{now - last[a]:.0f} s while rank {src} still sends (timeout "
                                         f"{limit:.0f} s); has it died or hung?")
                    return
                if header[0] == DONE:
                    done.add(src)
                    continue
                theirs = torch.empty(sum(p.numel() for p in self.params_list), dtype=self.params_list[0].dtype)
                self._recv(theirs, src, TAG_MODEL, self.thread_comm, "model")
                with self.lock:  # the average is atomic against this rank's own update
                    mine = flatten(self.params_list)
                    host = mine.cpu()
                    send = self._send(host, src, TAG_REPLY, self.thread_comm)
                    unflatten_into((mine + theirs.to(mine.device)) / 2, self.params_list)
                send.wait()
                self.served += 1
                self.exchanges += 1
        except RuntimeError as e:
            silent = min((a for a in self.actives if a not in done), key=lambda a: last[a], default=None)
            self.thread_error = (f"ad_psgd rank {self.dist.rank} (passive): rank {silent} sent nothing for "
                                 f"{time.time() - last.get(silent, time.time()):.0f} s ({e})")

    # -- the end, evaluation, figures
    def finish(self, ctx) -> None:
        """Active ranks tell every passive rank they are done; passive ranks wait for their thread."""
        if self.dist.world_size == 1 or self.params.gossip == "sync":
            return
        if self.active:
            for p in self.passives:
                w = self._send(torch.tensor([DONE, self.steps], dtype=torch.float64), p, TAG_REQUEST, self.comm)
                w.wait()
                self.done_sent += 1
        elif self.thread is not None:
            # the thread ends when every active rank has said it is done, or when one is silent for
            # ``timeout`` (its receive gives up): it never needs much longer than that
            self.thread.join(timeout=self.params.timeout + 60)
            if self.thread.is_alive():
                raise RuntimeError(f"ad_psgd rank {self.dist.rank} (passive): its serving thread did not end "
                                   f"within {self.params.timeout + 60:.0f} s of the training's end")
            self.thread = None
            self.comm.merge(self.thread_comm.state_dict())
            self.thread_comm = CommCounter()
            if self.thread_error:
                raise RuntimeError(self.thread_error)

    def eval_model(self, model: nn.Module) -> nn.Module | None:
        """The average of all ranks' models (one all-reduce), on every rank."""
        if self.dist.world_size == 1:
            return model
        with self.state_lock():
            flat = flatten(list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()])
        all_reduce(flat, self.comm, None, "eval")
        self.evals += 1
        avg = copy.deepcopy(model)
        unflatten_into(flat / self.dist.world_size,
                       list(avg.parameters()) + [b for b in avg.buffers() if b.is_floating_point()])
        return avg

    def predicted_comm(self) -> dict:
        """The cost model for what this rank did: per exchange P values each way (and the active
        rank's 2-value header), per synchronous-gossip step one send and one receive of P values, the
        end's "done" messages, and one all-reduce of P + buffers per evaluation (ring formula)."""
        from asr_parallel.strategies.base import ring_allreduce_bytes

        p = sum(t.numel() for t in self.params_list)
        bufs = sum(b.numel() for b in self.model.buffers() if b.is_floating_point())
        k = self.dist.world_size
        gossip = [0, 0]
        if k > 1 and self.params.gossip == "sync":
            gossip = [self.exchanges * p * 4, 2 * self.exchanges]
        elif k > 1 and self.active:
            gossip = [self.exchanges * (16 + p * 4) + self.done_sent * 16, 3 * self.exchanges + self.done_sent]
        elif k > 1:
            gossip = [self.served * p * 4, 3 * self.served + len(self.actives)]
        by_label = {"gossip": gossip} if gossip[1] else {}
        if self.evals and k > 1:
            by_label["eval"] = [self.evals * ring_allreduce_bytes(p + bufs, 4, k), self.evals]
        return {"bytes_sent": sum(v[0] for v in by_label.values()), "calls": sum(v[1] for v in by_label.values()),
                "by_label": by_label}

    def summary_figures(self) -> dict:
        return {"exchanges": self.exchanges, "served": self.served, "gossip": self.params.gossip}

    def state_dict(self) -> dict:
        state = super().state_dict()
        counter = CommCounter()  # the thread's calls so far belong to the run's counts
        counter.merge(self.comm.state_dict())
        counter.merge(self.thread_comm.state_dict())
        state["comm"] = counter.state_dict()
        state["ad_psgd"] = {"steps": self.steps, "exchanges": self.exchanges, "served": self.served,
                            "evals": self.evals,
                            "rng": repr(self.rng.getstate())}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.thread_comm = CommCounter()
        a = state["ad_psgd"]
        self.steps, self.exchanges, self.served, self.evals = a["steps"], a["exchanges"], a["served"], a["evals"]
        import ast

        self.rng.setstate(ast.literal_eval(a["rng"]))
