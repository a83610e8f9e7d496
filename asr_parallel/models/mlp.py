"""``mlp``: the survey's analysis model, a DNN of L equal-width layers over spliced filterbank
frames (Yook, Lee, Yoo 2020; as the hybrid DNNs of Hinton et al. 2012 and the pipelined-BP
experiments of Chen et al. 2012). Trained here with CTC over BPE units; ``subsample`` keeps every
n-th spliced frame (Kaldi chain models use 3) so the output rate suits subword units."""

from __future__ import annotations

from asr_parallel.models.base import AcousticModel
from asr_parallel.models.layers import FeedForward, Output, Splice


def build_mlp(input_dim: int, vocab_size: int, num_layers: int, hidden_dim: int, context_left: int,
              context_right: int, subsample: int, dropout: float, activation: str = "relu") -> AcousticModel:
    splice = Splice(input_dim, context_left, context_right, subsample)
    stages = [("splice", splice)]
    dim, ratio = splice.output_dim, 1.0 / subsample
    for i in range(num_layers):
        stages.append((f"layer{i + 1}", FeedForward(dim, hidden_dim, dropout, ratio, activation)))
        dim = hidden_dim
    stages.append(("output", Output(dim, vocab_size, ratio)))
    return AcousticModel(stages)
