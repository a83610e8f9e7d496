"""Single-process training in which chosen stages of the model learn from gradients ``--delay`` steps
old: a probe of how much a model suffers from the stale gradients of pipelined back-propagation or
asynchronous SGD, without any pipeline or second rank.

At every step, the parameters of the ``--stages`` (indices into the model's stages, e.g. ``0`` for
the convolutional front end of the conformer) are updated with the gradient computed ``--delay``
steps earlier, at the weights of that time (the other parameters with the gradient of this step);
the first ``--delay`` steps update the other parameters only. This is pipelined back-propagation's
delay on its first part with weight stashing (Chen et al., Interspeech 2012; PipeDream, Narayanan et
al., SOSP 2019) in isolation: the same minibatches, the same initial weights and dropout, so that its
dev loss against ``--delay 0`` (which is exactly ``asr_parallel.bin.train``) is the cost of the delay
alone. Gradient clipping acts on the current step's whole gradient, before the delay.

    .venv/bin/python -m asr_parallel.bin.delay_probe --config recipes/chime6_sim.yaml \\
        --set train.epochs=2 --delay 2 --stages 0 --exp-dir exp/delay_probe/d2_s0

RESULTS.md ("Pipelined BP and stale gradients") has what it measured.
"""

from __future__ import annotations

import collections
import sys

import torch

from asr_parallel.stages import experiment_parser
from asr_parallel.train.step import StepContext


class DelayedStepContext(StepContext):
    """A step context whose update gives ``delayed`` parameters the gradient of ``delay`` steps ago."""

    def __init__(self, base: StepContext, delayed: list[torch.nn.Parameter], delay: int):
        self.__dict__.update(base.__dict__)
        self.delayed = list(delayed)
        self.delay = delay
        self.queue: collections.deque = collections.deque()

    def apply(self, bad: torch.Tensor) -> None:
        if bool(bad.item()):  # a skipped step computed no gradient to keep
            return super().apply(bad)
        self.queue.append([None if p.grad is None else p.grad.detach().clone() for p in self.delayed])
        old = self.queue.popleft() if len(self.queue) > self.delay else [None] * len(self.delayed)
        for p, g in zip(self.delayed, old):
            p.grad = g  # None: no update of p in this step (the optimiser skips it)
        super().apply(bad)


def parser():
    p = experiment_parser(__doc__)
    p.add_argument("--delay", type=int, required=True, help="steps by which the chosen stages' gradients are late")
    p.add_argument("--stages", required=True, help="comma-separated indices of the model's stages to delay, e.g. 0,1")
    return p


def make_trainer(args, cfg, exp, dist, train_cuts, dev_cuts, sp):
    from asr_parallel.train.trainer import Trainer, TrainingError

    if dist.world_size != 1 or cfg.strategy.get("name") != "single":
        raise TrainingError("the delay probe is single-process training (strategy single, one rank)")
    if args.exp_dir is None:
        raise TrainingError("give the probe its own --exp-dir (it is not the config's training)")
    if args.delay < 0:
        raise TrainingError(f"--delay must be >= 0, got {args.delay}")
    stages = [int(s) for s in args.stages.split(",") if s.strip()]

    class DelayTrainer(Trainer):
        def _setup_training(self, model):
            super()._setup_training(model)
            n = len(model.stages)
            bad = [s for s in stages if not 0 <= s < n]
            if bad:
                raise TrainingError(f"--stages {args.stages}: the model has stages 0..{n - 1} ({', '.join(model.stage_names)})")
            params = [p for s in stages for p in model.stages[s].parameters()]
            self.ctx = DelayedStepContext(self.ctx, params, args.delay)

        def fingerprint(self) -> str:  # never mistaken for (or resumed as) the plain training
            return f"{super().fingerprint()}-delay{args.delay}-stages{','.join(map(str, stages))}"

    return DelayTrainer(cfg, exp, dist, train_cuts, dev_cuts, sp)


def main(argv=None):
    from asr_parallel.bin.train import main as train_main

    train_main(argv, parser=parser(), make_trainer=make_trainer)


if __name__ == "__main__":
    main(sys.argv[1:])
