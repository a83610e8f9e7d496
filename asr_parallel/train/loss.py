"""The training criterion and its data augmentation, shared by the trainer, the strategies that own
the step (pipelines) and the benchmarks.

* :func:`ctc_loss`: CTC (Graves et al., ICML 2006) over BPE units, blank = 0, summed over the batch
  in float32; the caller divides by the utterances it averages over (its own, or all ranks').
* :class:`SpecAugment`: Park et al., "SpecAugment" (Interspeech 2019), the LibriSpeech basic policy
  reduced to two frequency masks of up to 27 bins and two time masks of up to 5% of the frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ctc_loss(logits: torch.Tensor, out_lens: torch.Tensor, tokens: list[list[int]]) -> torch.Tensor:
    """CTC loss summed over the batch (blank = 0), from (B, T, V) logits, in float32.

    On GPU the targets go to the device without waiting (pinned, non-blocking), and the two length
    tensors are best given on the host: ATen's CTC reads lengths on the host, so lengths on the
    device cost a copy back that waits for the GPU (the trainer passes output lengths computed on
    the host, :meth:`AcousticModel.output_lengths`)."""
    log_probs = logits.float().log_softmax(-1)
    targets = torch.tensor([t for seq in tokens for t in seq], dtype=torch.long)
    target_lens = torch.tensor([len(seq) for seq in tokens], dtype=torch.long)
    if log_probs.is_cuda:  # copy the targets without making the host wait for the GPU
        targets = targets.pin_memory().to(log_probs.device, non_blocking=True)
    return F.ctc_loss(log_probs.transpose(0, 1), targets, out_lens, target_lens, blank=0,
                      reduction="sum", zero_infinity=False)


def host_output_lengths(model, out_lens: torch.Tensor, host_lens: torch.Tensor) -> torch.Tensor:
    """The output lengths CTC should get: ``out_lens`` when they are on the host already, else the
    same lengths computed on the host from the input lengths ``host_lens`` by ``model``'s
    :meth:`~asr_parallel.models.base.AcousticModel.output_lengths`, so that CTC does not copy them
    back from a device (which would make the host wait for it)."""
    if out_lens.device.type == "cpu":
        return out_lens
    return model.output_lengths(host_lens.cpu())


class SpecAugment(torch.nn.Module):
    """Two frequency masks of up to 27 bins and time masks covering up to 5% of the frames
    (Park et al., Interspeech 2019, LibriSpeech basic policy), drawn per utterance."""

    def __init__(self):
        super().__init__()
        import torchaudio

        self.freq = torchaudio.transforms.FrequencyMasking(27, iid_masks=True)
        self.time = torchaudio.transforms.TimeMasking(40, iid_masks=True, p=0.05)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = feats.transpose(1, 2).unsqueeze(1)  # (B, 1, F, T)
        for _ in range(2):
            x = self.freq(x)
            x = self.time(x)
        return x.squeeze(1).transpose(1, 2)
