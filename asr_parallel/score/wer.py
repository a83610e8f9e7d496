"""Word error rate by the CHiME-6 track-1 rules, with kaldialign for the alignment.

Reference and hypothesis are both passed through :func:`asr_parallel.text.scoring_text` (lowercase,
bracketed tokens dropped, mm/mhm/mmm -> hmm); utterances whose reference holds [redacted] are
excluded. Errors are counted Kaldi's way (``compute-wer``): insertions, deletions and substitutions
of the minimum edit-distance alignment, over the number of reference words.
"""

from __future__ import annotations

from dataclasses import dataclass

import kaldialign

from asr_parallel.text import scoring_text


@dataclass
class ErrorCounts:
    words: int = 0
    ins: int = 0
    dels: int = 0
    subs: int = 0
    utterances: int = 0

    @property
    def errors(self) -> int:
        return self.ins + self.dels + self.subs

    @property
    def wer(self) -> float:
        return 100.0 * self.errors / self.words if self.words else 0.0

    def add(self, other: "ErrorCounts") -> None:
        self.words += other.words
        self.ins += other.ins
        self.dels += other.dels
        self.subs += other.subs
        self.utterances += other.utterances

    def kaldi(self) -> str:
        return f"%WER {self.wer:.2f} [ {self.errors} / {self.words}, {self.ins} ins, {self.dels} del, {self.subs} sub ]"

    def to_dict(self) -> dict:
        return {"wer": round(self.wer, 2), "errors": self.errors, "words": self.words, "ins": self.ins,
                "del": self.dels, "sub": self.subs, "utterances": self.utterances}


def utterance_errors(ref: str, hyp: str) -> ErrorCounts | None:
    """Errors of one utterance after CHiME-6 normalisation; None when the reference is excluded."""
    r = scoring_text(ref)
    h = scoring_text(hyp)
    if r is None:
        return None
    rw, hw = r.split(), (h or "").split()
    counts = ErrorCounts(words=len(rw), utterances=1)
    for a, b in kaldialign.align(rw, hw, "*"):
        if a == "*":
            counts.ins += 1
        elif b == "*":
            counts.dels += 1
        elif a != b:
            counts.subs += 1
    return counts


def corpus_errors(pairs) -> ErrorCounts:
    """Total over (reference, hypothesis) pairs."""
    total = ErrorCounts()
    for ref, hyp in pairs:
        c = utterance_errors(ref, hyp)
        if c is not None:
            total.add(c)
    return total
