"""Training and evaluation batches from lhotse cuts with precomputed features.

Batches come from lhotse's ``DynamicBucketingSampler`` (cuts of similar duration together, up to
``max_duration`` seconds per batch), each rank reading its own shard. A batch holds padded features
(B, T, F), their lengths, the BPE token ids of each transcript and the cut ids.

Utterances whose token sequence cannot fit the model's CTC output (fewer output frames than tokens
plus the blanks needed between repeated tokens) are removed before training, with a printed count.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from asr_parallel.text import training_text

log = logging.getLogger(__name__)


@dataclass
class Batch:
    feats: torch.Tensor  # (B, T, F)
    feat_lens: torch.Tensor  # (B,)
    tokens: list[list[int]]
    texts: list[str]
    cut_ids: list[str]
    host_lens: torch.Tensor | None = None  # feat_lens on the host, kept by to() (no copy back)

    @property
    def lens_on_host(self) -> torch.Tensor:
        """The frame counts on the host, read without waiting for a device."""
        return self.host_lens if self.host_lens is not None else self.feat_lens

    @property
    def num_frames(self) -> int:
        return int(self.lens_on_host.sum())

    def pin_memory(self) -> "Batch":
        """The batch in page-locked host memory (the DataLoader's ``pin_memory``), so that ``to``
        copies it to a GPU without the host waiting."""
        return Batch(self.feats.pin_memory(), self.feat_lens.pin_memory(), self.tokens, self.texts, self.cut_ids,
                     self.host_lens)

    def to(self, device) -> "Batch":
        host = self.feat_lens if self.feat_lens.device.type == "cpu" else self.host_lens
        return Batch(self.feats.to(device, non_blocking=True), self.feat_lens.to(device, non_blocking=True),
                     self.tokens, self.texts, self.cut_ids, host)


PAD_UNIT = 16  # frames: the foot of the padding ladder (a multiple of every model's subsampling)


def ladder(value: int, unit: int, growth: float) -> int:
    """The smallest rung >= ``value`` of the ladder unit, ..., where each rung is the smallest multiple
    of ``unit`` at least ``growth`` times the one before (and at least one unit more): with growth 1,
    the multiples of ``unit``; with growth 1.25 from 16 frames, 16, 32, 48, 64, 80, 112, 144, 192, ...
    (far up the ladder a length grows by at most about growth times, plus one unit; near its foot
    by up to one unit: 17 frames become 32)."""
    rung = unit
    while rung < value:
        rung = max(rung + unit, unit * math.ceil(rung * growth / unit - 1e-9))
    return rung


class CutDataset(torch.utils.data.Dataset):
    """Maps a CutSet (a batch from the sampler) to a :class:`Batch`; with ``pad_growth`` > 1 the
    frames are zero-padded up to a rung of :func:`ladder` (``train.pad_growth``)."""

    def __init__(self, sp, pad_growth: float = 1.0):
        self.sp = sp
        self.pad_growth = pad_growth

    def __getitem__(self, cuts) -> Batch:
        from lhotse.dataset.collation import collate_features

        cuts = cuts.sort_by_duration(ascending=False)
        feats, lens = collate_features(cuts)
        if self.pad_growth > 1.0:
            frames = ladder(feats.shape[1], PAD_UNIT, self.pad_growth)
            feats = torch.nn.functional.pad(feats, (0, 0, 0, frames - feats.shape[1]))
        texts = [training_text(c.supervisions[0].text) for c in cuts]
        tokens = self.sp.encode(texts)
        return Batch(feats, lens, tokens, texts, [c.id for c in cuts])


def ctc_min_frames(tokens: list[int]) -> int:
    """CTC needs a frame per token plus a blank between each pair of equal neighbours."""
    return len(tokens) + sum(1 for a, b in zip(tokens, tokens[1:]) if a == b)


def filter_for_ctc(cuts, sp, output_lengths, desc: str, report: bool = True):
    """Drop cuts that CTC cannot align (too many tokens for the output frames) or with no tokens.

    An eager CutSet comes back as a new eager CutSet; a lazy one (``train.lazy_manifests``) as a lazy
    filter over the same manifest, after one streaming pass that counts what it drops (nothing is
    held in memory). The figures: ``dropped_too_long``, ``dropped_empty`` and ``kept``, and
    ``digest``: a hash of the kept cuts' ids and durations in manifest order, which with the sampler's
    settings decides an epoch's batch plan (the trainer keys its cached epoch length on it)."""
    import hashlib

    from lhotse import CutSet

    def fits(cut) -> str:
        tokens = sp.encode(training_text(cut.supervisions[0].text))
        if not tokens:
            return "empty"
        frames = int(output_lengths(torch.tensor([cut.num_frames]))[0])
        return "ok" if frames >= ctc_min_frames(tokens) else "long"

    lazy = bool(getattr(cuts, "is_lazy", False))
    kept, counts, digest = [], {"ok": 0, "long": 0, "empty": 0}, hashlib.sha256()
    for cut in cuts:
        verdict = fits(cut)
        counts[verdict] += 1
        if verdict == "ok":
            digest.update(f"{cut.id}\t{cut.duration!r}\n".encode())
            if not lazy:
                kept.append(cut)
    if (counts["long"] or counts["empty"]) and report:
        msg = (f"{desc}: removed {counts['long']} utterance(s) whose BPE sequence cannot fit the CTC output length "
               f"and {counts['empty']} with no words left after removing event tags; {counts['ok']} remain")
        log.warning(msg)
        print(msg)

    def keep(cut) -> bool:  # the lazy filter's predicate (the sampler reads it in this process)
        return fits(cut) == "ok"

    out = cuts.filter(keep) if lazy else CutSet.from_cuts(kept)
    return out, {"dropped_too_long": counts["long"], "dropped_empty": counts["empty"], "kept": counts["ok"],
                 "digest": digest.hexdigest()[:16]}


def make_sampler(cuts, max_duration: float, num_buckets: int, shuffle: bool, rank: int, world_size: int, seed: int):
    import warnings

    from lhotse.dataset import DynamicBucketingSampler

    # An eager cut set (the default: the simulated corpus is small) is shuffled whole, lhotse's
    # buffer holding all of it; a lazy one (train.lazy_manifests) streams through lhotse's default
    # buffer of 20 000 cuts (shuffled within it; duration bins estimated from the manifest's first
    # cuts), as icefall reads large corpora: a manifest in session order mixes only within it.
    lazy = bool(getattr(cuts, "is_lazy", False))
    warnings.filterwarnings("ignore", message="You are using DynamicBucketingSampler with an eagerly read CutSet")
    return DynamicBucketingSampler(cuts, max_duration=max_duration, shuffle=shuffle, num_buckets=num_buckets,
                                   drop_last=shuffle, world_size=world_size, rank=rank, seed=seed,
                                   buffer_size=20000 if lazy else max(1000, len(cuts)))


def loader_workers(num_workers, device: torch.device, ranks_here: int = 1) -> int:
    """``train.num_workers`` resolved: a count as given; ``"auto"``: none on a CPU rank, where the
    step, not the data, is the bottleneck (the recipe's loader delivers its batches about 80 times as
    fast as a CPU training step consumes them on one thread: ``bench_loader``, RESULTS.md) and a
    worker would only take a core from the ranks; on a GPU rank, up to 4, within this rank's share
    of the host's cores (its own cores when the launcher bound it to some) less one for the training
    thread (lilcom decoding and collation then overlap the device's step)."""
    import os

    if num_workers != "auto":
        return int(num_workers)
    if device.type != "cuda":
        return 0
    total = os.cpu_count() or 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
    if cores >= total:  # the rank may use every core: its share is 1 / ranks_here of them
        cores //= max(1, ranks_here)
    # else the launcher bound this rank to its own cores already (Slurm, NUMA binding)
    return max(0, min(4, cores - 1))


def loader(dataset, batches, num_workers: int, pin_memory: bool = False):
    """A DataLoader over an iterable of CutSet batches (the sampler, possibly fast-forwarded);
    ``pin_memory`` (for a GPU) puts each batch in page-locked memory, on a thread of the loader.

    It gets a generator of its own: by default a DataLoader draws its workers' base seed from the
    global torch generator, which would shift dropout and SpecAugment after a resume."""
    return torch.utils.data.DataLoader(dataset, sampler=batches, batch_size=None, num_workers=num_workers,
                                       persistent_workers=False, pin_memory=pin_memory,
                                       generator=torch.Generator().manual_seed(0))
