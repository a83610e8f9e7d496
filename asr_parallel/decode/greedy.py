"""Greedy CTC decoding: the best unit per frame, repeats merged, blanks (unit 0) removed."""

from __future__ import annotations

import torch


def greedy_ctc(log_probs: torch.Tensor, lengths: torch.Tensor, blank: int = 0) -> list[list[int]]:
    """(B, T, V) scores and lengths -> token id sequences."""
    best = log_probs.argmax(-1).cpu()
    out = []
    for seq, n in zip(best, lengths.cpu().tolist()):
        seq = torch.unique_consecutive(seq[:n])
        out.append([int(t) for t in seq if t != blank])
    return out
