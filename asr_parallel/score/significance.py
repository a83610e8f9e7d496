"""Confidence intervals of a WER and the significance of a WER difference, by the bootstrap.

M. Bisani and H. Ney, "Bootstrap estimates for confidence intervals in ASR performance evaluation",
ICASSP 2004. A test set is a sample of utterances; its word error rate is the ratio of two sums over
them, errors over reference words. Drawing B new test sets of the same size from the utterances with
replacement, and taking each one's WER (its errors summed over its reference words summed, never a
mean of per-utterance rates), gives the WER's sampling distribution; its 2.5 and 97.5 percentiles
bound a 95% confidence interval. Two systems decoded on the same utterances are compared on the same
resampled sets (a paired bootstrap): the difference of their WERs has an interval of its own, and
the *probability of improvement* (Bisani and Ney's poi) is the fraction of resampled sets on which
system B has the lower WER than system A. Here a resampled set on which both have the same WER
counts one half, so two identical systems get 0.5; the fraction of such ties is reported with it.

Utterances of one speaker or one session are not independent (the same voice, room, microphone);
``unit="speaker"`` or ``"session"`` resamples whole speakers or sessions instead (a block bootstrap:
errors and words are summed per block first), which gives wider, more honest intervals when there
are enough blocks; CHiME-6's dev and eval sets have only 2 sessions each, too few for that.

Per-utterance errors are those of stage 7 (:func:`asr_parallel.score.wer.utterance_errors`,
CHiME-6 normalisation; utterances whose reference holds [redacted] are excluded), so the WER at the
centre of every interval is the one of ``results.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asr_parallel.score.wer import utterance_errors

UNITS = ("utterance", "speaker", "session")
# Resampled sets are drawn in chunks of at most this many indices, to bound memory on large test sets.
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class UtteranceScores:
    """Per-utterance error counts of one system on one test set (arrays aligned with ``ids``)."""

    ids: tuple[str, ...]
    errors: np.ndarray
    words: np.ndarray
    speakers: tuple[str, ...]
    sessions: tuple[str, ...]

    @property
    def wer(self) -> float:
        words = int(self.words.sum())
        return 100.0 * int(self.errors.sum()) / words if words else 0.0

    def __len__(self) -> int:
        return len(self.ids)


def scores_from_rows(rows: list[dict], source: str = "rows") -> UtteranceScores:
    """Error counts of decoded utterances (the rows of ``decode/<method>/<set>.jsonl``: ``id``,
    ``ref``, ``hyp``, ``speaker``, ``session``); excluded utterances are left out."""
    ids, errors, words, speakers, sessions = [], [], [], [], []
    seen = set()
    for r in rows:
        if r["id"] in seen:
            raise ValueError(f"{source}: utterance '{r['id']}' appears twice")
        seen.add(r["id"])
        c = utterance_errors(r["ref"], r["hyp"])
        if c is None:
            continue
        ids.append(r["id"])
        errors.append(c.errors)
        words.append(c.words)
        speakers.append(str(r.get("speaker", "")))
        sessions.append(str(r.get("session", "")))
    return UtteranceScores(tuple(ids), np.asarray(errors, dtype=np.int64), np.asarray(words, dtype=np.int64),
                           tuple(speakers), tuple(sessions))


def read_scores(path: Path) -> UtteranceScores:
    """:func:`scores_from_rows` of a decoding's ``.jsonl`` file."""
    from asr_parallel.score.report import read_rows

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; decode (stage 6) and score (stage 7) this experiment")
    return scores_from_rows(read_rows(path), str(path))


def _blocks(scores: UtteranceScores, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """Per resampling unit: (unit index of every utterance, number of units)."""
    if unit not in UNITS:
        raise ValueError(f"unknown resampling unit '{unit}'; valid units: {', '.join(UNITS)}")
    if unit == "utterance":
        return np.arange(len(scores)), len(scores)
    keys = scores.speakers if unit == "speaker" else scores.sessions
    names = sorted(set(keys))
    index = {k: i for i, k in enumerate(names)}
    return np.asarray([index[k] for k in keys], dtype=np.int64), len(names)


def _resampled_sums(columns: np.ndarray, num_resamples: int, seed: int) -> np.ndarray:
    """``columns`` (k, n): k per-unit statistics. Returns (k, B): their sums over B sets of n units
    drawn with replacement (the same draws for every statistic: a paired bootstrap)."""
    rng = np.random.default_rng(seed)
    k, n = columns.shape
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n))
    out = np.empty((k, num_resamples), dtype=np.float64)
    for start in range(0, num_resamples, chunk):
        stop = min(num_resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        for j in range(k):
            out[j, start:stop] = columns[j][idx].sum(axis=1)
    return out


def _rate(errors: np.ndarray, words: np.ndarray) -> np.ndarray:
    """100 * errors / words, 0 where there are no words (as :attr:`ErrorCounts.wer`)."""
    return np.divide(100.0 * errors, words, out=np.zeros_like(errors, dtype=np.float64), where=words > 0)


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def _check(num_resamples: int, level: float, scores: UtteranceScores) -> None:
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if len(scores) == 0:
        raise ValueError("no scored utterances: nothing to resample")


@dataclass(frozen=True)
class WerInterval:
    """A corpus WER (%) and its bootstrap confidence interval."""

    wer: float
    low: float
    high: float
    level: float
    resamples: int
    unit: str
    units: int  # utterances, speakers or sessions resampled

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def to_dict(self) -> dict:
        return {"wer": round(self.wer, 2), "ci": [round(self.low, 2), round(self.high, 2)], "level": self.level,
                "resamples": self.resamples, "unit": self.unit, "units": self.units}


def bootstrap_wer(scores: UtteranceScores, num_resamples: int = 1000, level: float = 0.95, seed: int = 0,
                  unit: str = "utterance") -> WerInterval:
    """The WER of ``scores`` with its ``level`` percentile interval over ``num_resamples`` test sets
    drawn with replacement (whole ``unit``s at a time)."""
    _check(num_resamples, level, scores)
    block, n = _blocks(scores, unit)
    columns = np.stack([np.bincount(block, weights=scores.errors, minlength=n),
                        np.bincount(block, weights=scores.words, minlength=n)])
    errors, words = _resampled_sums(columns, num_resamples, seed)
    low, high = _interval(_rate(errors, words), level)
    return WerInterval(scores.wer, low, high, level, num_resamples, unit, n)


@dataclass(frozen=True)
class PairedComparison:
    """System B against system A on the same utterances."""

    wer_a: float
    wer_b: float
    low: float  # interval of wer_b - wer_a
    high: float
    poi: float  # probability that B's WER is below A's (ties count one half)
    ties: float  # fraction of resampled sets on which both WERs are equal
    level: float
    resamples: int
    unit: str
    units: int

    @property
    def difference(self) -> float:
        return self.wer_b - self.wer_a

    @property
    def verdict(self) -> str:
        """``tie`` when the difference's interval contains 0, else ``better`` (B lower) or ``worse``."""
        if self.low <= 0.0 <= self.high:
            return "tie"
        return "better" if self.high < 0.0 else "worse"

    def to_dict(self) -> dict:
        return {"difference": round(self.difference, 2), "difference_ci": [round(self.low, 2), round(self.high, 2)],
                "poi": round(self.poi, 4), "ties": round(self.ties, 4), "verdict": self.verdict,
                "level": self.level, "resamples": self.resamples, "unit": self.unit, "units": self.units}


def _align(a: UtteranceScores, b: UtteranceScores, name_a: str, name_b: str) -> np.ndarray:
    """Index into ``b`` of every utterance of ``a``; an error when the utterance sets or references differ."""
    pos_b = {u: i for i, u in enumerate(b.ids)}
    only_a = [u for u in a.ids if u not in pos_b]
    only_b = sorted(set(b.ids) - set(a.ids))
    if only_a or only_b:
        def some(ids):
            return ", ".join(ids[:5]) + (f" ... ({len(ids)} in all)" if len(ids) > 5 else "")

        parts = ([f"{len(only_a)} missing from {name_b}: {some(only_a)}"] if only_a else []) + \
                ([f"{len(only_b)} missing from {name_a}: {some(only_b)}"] if only_b else [])
        raise ValueError(f"{name_a} and {name_b} were scored on different utterances ({'; '.join(parts)}); "
                         "a paired comparison needs the same test set")
    order = np.asarray([pos_b[u] for u in a.ids], dtype=np.int64)
    differ = np.nonzero(a.words != b.words[order])[0]
    if len(differ):
        i = differ[0]
        raise ValueError(f"{name_a} and {name_b} have different references for {len(differ)} utterance(s), e.g. "
                         f"'{a.ids[i]}' ({a.words[i]} against {b.words[order[i]]} words); "
                         "were they decoded on the same corpus?")
    return order


def paired_bootstrap(a: UtteranceScores, b: UtteranceScores, num_resamples: int = 1000, level: float = 0.95,
                     seed: int = 0, unit: str = "utterance", name_a: str = "system A",
                     name_b: str = "system B") -> PairedComparison:
    """Paired bootstrap of B against A (Bisani and Ney 2004): both WERs on the same resampled sets."""
    _check(num_resamples, level, a)
    order = _align(a, b, name_a, name_b)
    block, n = _blocks(a, unit)
    columns = np.stack([np.bincount(block, weights=a.errors, minlength=n),
                        np.bincount(block, weights=b.errors[order], minlength=n),
                        np.bincount(block, weights=a.words, minlength=n)])
    errors_a, errors_b, words = _resampled_sums(columns, num_resamples, seed)
    wer_a, wer_b = _rate(errors_a, words), _rate(errors_b, words)
    # Both WERs share the denominator: compare error counts, exactly, rather than rounded rates.
    better = float(np.mean(errors_b < errors_a))
    ties = float(np.mean(errors_b == errors_a))
    low, high = _interval(wer_b - wer_a, level)
    return PairedComparison(a.wer, b.wer, low, high, better + 0.5 * ties, ties, level, num_resamples, unit, n)
