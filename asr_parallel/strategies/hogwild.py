"""``hogwild``: lock-free updates of one shared parameter vector by every rank of a machine.

Niu, Recht, Re, Wright, "Hogwild!: a lock-free approach to parallelizing stochastic gradient descent"
(NIPS 2011). Every rank (a process under torchrun) reads the parameters, computes the gradient of its
own minibatch and writes its update into the same memory, with no lock and no message: updates of
different ranks may interleave and overwrite each other (the paper's analysis bounds the harm when
updates are sparse; dense neural-network updates collide more). PyTorch's ``mnist_hogwild`` example
shares a model between processes the same way.

Sharing: rank 0 writes the initial parameters (and floating buffers) into a file in ``/dev/shm``
and every rank maps it (``torch.from_file(..., shared=True)``); each parameter is then a view into
that one buffer, so ``optimizer.step()`` of any rank changes the model of all. The file's name is
drawn at random by rank 0 and sent to the others, so runs on one machine never share one, and rank 0
removes the name once every rank has mapped the file (the memory stays until the last rank exits, and
a crashed run leaves nothing behind). The
optimiser's state (momentum, Adam's moments) stays private to each rank, and each rank's step
applies its own decoupled weight decay (AdamW) to the shared vector: one decay per minibatch, as a
single process applies per minibatch; batch-norm statistics are shared and race too.
CPU ranks on one machine only (a clear error otherwise).

Between the trainer's common pauses (checkpoints, epoch ends) no rank waits for another and no call
is made; before a checkpoint every rank stops at a barrier (label ``hogwild``), so the state saved
is one moment's. The evaluated and saved model is the shared one. Resume continues from the saved
parameters, but not exactly: the interleaving of updates is the machine's.

Faults: with no message between pauses, a hung rank is noticed by the others at the next pause's
barrier, which fails after ``train.collective_timeout``; a rank that dies is seen by torchrun's
agent, which stops (or, with ``train.max_restarts``, restarts) the whole group, as for every strategy.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from asr_parallel.strategies.base import Strategy


class Hogwild(Strategy):
    name = "hogwild"

    @dataclass
    class Params:
        shm_dir: str = "/dev/shm"  # where the shared parameter file lives (a RAM-backed file system)

    def __init__(self, params, dist):
        super().__init__(params, dist)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
        self.barriers = 0  # the barriers of the set-up and the pauses, for predicted_comm
        if dist.device.type != "cpu":
            raise ValueError("strategy hogwild shares CPU memory between processes: set train.device cpu")
        if local != dist.world_size:
            raise ValueError(f"strategy hogwild needs every rank on one machine ({dist.world_size} ranks, "
                             f"{local} on this node); it cannot run across nodes (train.emulate_nodes)")
        self.path: Path | None = None

    def _barrier(self) -> None:
        import torch.distributed as tdist

        if self.dist.world_size > 1:
            self.comm.control(1, 0, "hogwild")
            self.barriers += 1
            tdist.barrier()

    def _file(self, token: int) -> Path:
        return Path(self.params.shm_dir) / f"asr_parallel_hogwild_{token:016x}.bin"

    def wrap_model(self, model: nn.Module) -> nn.Module:
        self.model = model
        if self.dist.world_size == 1:
            return model
        import torch.distributed as tdist

        tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
        if any(t.dtype != torch.float32 for t in tensors):
            raise ValueError("strategy hogwild shares float32 parameters only")
        n = sum(t.numel() for t in tensors)
        # one name per run, drawn by rank 0 and sent to the others once the file holds its model (the
        # broadcast is the set-up's first coordination call): two runs on a machine never share a file
        token = torch.tensor([secrets.randbits(62) if self.dist.rank == 0 else 0], dtype=torch.int64)
        if self.dist.rank == 0:
            self.path = self._file(int(token))
            try:
                shared = torch.from_file(str(self.path), shared=True, size=n, dtype=torch.float32)
            except RuntimeError as e:
                raise ValueError(f"strategy hogwild: cannot create {self.path} ({n * 4} bytes): {e}") from e
            torch.cat([t.detach().reshape(-1) for t in tensors], out=shared)
        self.comm.add(8 if self.dist.rank == 0 else 0, 1, "hogwild")  # 8 bytes from rank 0
        tdist.broadcast(token, 0)  # the file exists and holds rank 0's model
        self.path = self._file(int(token))
        shared = torch.from_file(str(self.path), shared=True, size=n, dtype=torch.float32)
        offset = 0
        for t in tensors:
            k = t.numel()
            t.data = shared[offset:offset + k].view_as(t)
            offset += k
        self.shared = shared
        self._barrier()  # every rank mapped it: the name can go (the mappings stay), so a crash leaves no file
        if self.dist.rank == 0:
            self._remove()
        return model

    def _remove(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass

    def prepare_checkpoint(self, ctx) -> list[dict]:
        self._barrier()  # nobody writes while the state is read
        return []

    def end_of_epoch(self, ctx) -> list[dict]:
        self._barrier()
        return []

    def finish(self, ctx) -> None:
        self._barrier()

    def predicted_comm(self) -> dict:
        """No parameter or gradient travels: the ranks share memory. The calls (label ``hogwild``) are
        the set-up's broadcast of the file's name (8 bytes from rank 0) and a barrier at the set-up and
        at every pause (checkpoint, epoch end, the end), from the number of barriers this rank met."""
        if self.dist.world_size == 1:
            return {"bytes_sent": 0, "calls": 0, "by_label": {}}
        nbytes, calls = (8 if self.dist.rank == 0 else 0), 1 + self.barriers
        return {"bytes_sent": nbytes, "calls": calls, "by_label": {"hogwild": [nbytes, calls]}}

    def summary_figures(self) -> dict:
        return {"shared_bytes": int(self.shared.numel() * 4) if self.path is not None else 0}
