"""``one_f_one_b``: synchronous micro-batch pipeline with one-forward-one-backward scheduling.

Narayanan et al., "PipeDream: generalized pipeline parallelism for DNN training" (SOSP 2019), in its
synchronous flush form (as in Megatron-LM's and torch's 1F1B): after a warm-up of S-1-s forward
passes, stage s alternates one forward and one backward pass, so at most S-s micro-batches' activations
are held instead of M. Same update (equal to non-pipelined training under the conditions of
:mod:`asr_parallel.strategies.micro_pipeline`), bubble (S-1)/(M+S-1) and traffic as ``gpipe``; needs M >= S.
Engine: torch's ``torch.distributed.pipelining.Schedule1F1B``
(see :mod:`asr_parallel.strategies.micro_pipeline`).
"""

from __future__ import annotations

from asr_parallel.strategies.micro_pipeline import MicroPipeline


class OneFOneB(MicroPipeline):
    name = "one_f_one_b"
    schedule_name = "Schedule1F1B"
