"""``gpipe``: synchronous micro-batch pipeline, all forwards then all backwards.

Huang et al., "GPipe: efficient training of giant neural networks using pipeline parallelism"
(NeurIPS 2019). A minibatch of B utterances is cut into M micro-batches that flow through the S parts;
the gradients of all micro-batches accumulate and are applied once, so the update equals
non-pipelined training on the same minibatch (for models that treat every utterance on its own, as
the default conformer with ``conv_norm: layer``, and without dropout; see
:mod:`asr_parallel.strategies.micro_pipeline`). Idle fraction ("bubble") (S-1)/(M+S-1); activations
of all M micro-batches are held until their backward pass. Engine: torch's
``torch.distributed.pipelining.ScheduleGPipe`` (see :mod:`asr_parallel.strategies.micro_pipeline`).
Traffic per boundary per minibatch: M micro-batch activations forward and their gradients backward,
B*T*D*b bytes each way (padded B and T).
"""

from __future__ import annotations

from asr_parallel.strategies.micro_pipeline import MicroPipeline


class GPipe(MicroPipeline):
    name = "gpipe"
    schedule_name = "ScheduleGPipe"
