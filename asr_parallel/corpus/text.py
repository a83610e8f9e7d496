"""Real English sentences for the simulated corpus, from Debian's fortune-cookie files.

Source: the ``fortunes`` and ``fortunes-min`` Debian packages (fortune-mod 1.99.1, BSD licence;
see /usr/share/doc/fortunes/copyright). The files hold quotations, jokes and sayings separated by
lines containing ``%``. They are split into sentences and only sentences a speaker could read aloud
are kept: letters, apostrophes and ordinary punctuation, no digits, URLs or code.

To make word error rate meaningful on a small corpus, sentences are restricted to the most
frequent words of the source (``vocabulary_size``); train and test sentence pools are disjoint, so
the test sets hold new sentences over a shared vocabulary, as real conversations do.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

FORTUNE_DIR = Path("/usr/share/games/fortunes")
# The version of lm_text_sentences' rule: part of stage 4's fingerprint, so that a changed rule
# rebuilds the simulated corpus's LM and graph (and decodes again).
LM_TEXT_VERSION = 3
# Files of pictures, definitions or non-English material; the rest is prose.
EXCLUDED_FILES = {"art", "ascii-art", "translate-me", "perl", "linux", "debian", "definitions"}

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_ALLOWED = re.compile(r"^[A-Za-z' ,.!?]+$")
_ATTRIBUTION = re.compile(r"^\s*--")


@dataclass(frozen=True)
class SentencePools:
    train: list[str]
    eval: list[str]
    vocabulary: list[str]


def words_of(sentence: str) -> list[str]:
    """Lower-cased words of a display sentence, punctuation removed (Kaldi-style)."""
    return [w.strip("'") for w in re.sub(r"[.?,:;!]", " ", sentence.lower()).split() if w.strip("'")]


def _clean(sentence: str) -> str | None:
    s = sentence.replace("\t", " ").replace('"', "").replace("`", "'")
    s = s.replace(" -- ", ", ").replace("--", ", ").replace(" - ", ", ")
    s = re.sub(r"\s+", " ", s).strip().strip("()")
    if not s or not _ALLOWED.match(s):
        return None
    # Only sentences that start as sentences do and contain no shouting or initials.
    if not s[0].isupper() or re.search(r"[A-Z]{3,}", s) or re.search(r"\b[A-Za-z]\.", s[:-1]):
        return None
    if s[-1] not in ".!?":
        s += "."
    return s


def read_fortune_entries(directory: Path = FORTUNE_DIR, dedupe: bool = True) -> list[list[str]]:
    """The usable sentences of the fortune files entry by entry (a quotation, joke or saying), in a
    fixed order; with ``dedupe``, a sentence seen in an earlier entry is left out of later ones."""
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{directory}: the fortune text files are missing; install the Debian packages "
            "'fortunes' and 'fortunes-min' (tools/setup.sh does this when run as root)"
        )
    seen: set[str] = set()
    out: list[list[str]] = []
    for path in sorted(directory.iterdir()):
        if path.suffix or path.name in EXCLUDED_FILES or not path.is_file():
            continue
        text = path.read_text(encoding="latin-1")
        for entry in text.split("\n%\n"):
            lines = [ln for ln in entry.splitlines() if not _ATTRIBUTION.match(ln)]
            joined = " ".join(lines).replace('"', "")
            kept = []
            for raw in _SENTENCE_END.split(joined):
                s = _clean(raw)
                if s and (not dedupe or s.lower() not in seen):
                    seen.add(s.lower())
                    kept.append(s)
            if kept:
                out.append(kept)
    return out


def read_fortune_sentences(directory: Path = FORTUNE_DIR) -> list[str]:
    """All usable sentences of the fortune files, in a fixed order, without duplicates."""
    return [s for entry in read_fortune_entries(directory) for s in entry]


def sentence_pools(
    train_sentences: int,
    eval_sentences: int,
    vocabulary_size: int,
    min_words: int,
    max_words: int,
    seed: int,
    eval_oov_sentence_fraction: float = 0.1,
    directory: Path = FORTUNE_DIR,
) -> SentencePools:
    """Disjoint train and eval sentence pools over the ``vocabulary_size`` most frequent words.

    Eval sentences are new sentences, but only ``eval_oov_sentence_fraction`` of them may hold a
    word that no training sentence has: that keeps the test sets' out-of-vocabulary rate near the
    1-2 % of a real recognition task instead of letting it grow with the size of the text source.
    """
    sentences = [s for s in read_fortune_sentences(directory) if min_words <= len(words_of(s)) <= max_words]
    counts = Counter(w for s in sentences for w in words_of(s))
    vocabulary = {w for w, _ in counts.most_common(vocabulary_size)}
    usable = [s for s in sentences if all(w in vocabulary for w in words_of(s))]
    random.Random(seed).shuffle(usable)
    if len(usable) < train_sentences + eval_sentences:
        raise ValueError(
            f"only {len(usable)} sentences of {min_words}-{max_words} words use the {vocabulary_size} most "
            f"frequent words of {directory}; {train_sentences + eval_sentences} were asked for "
            "(train_sentences + eval_sentences): raise vocabulary_size or ask for fewer sentences"
        )
    train_pool, rest = usable[:train_sentences], usable[train_sentences:]
    train_vocab = {w for s in train_pool for w in words_of(s)}
    covered = [s for s in rest if all(w in train_vocab for w in words_of(s))]
    uncovered = [s for s in rest if not all(w in train_vocab for w in words_of(s))]
    n_oov = int(round(eval_sentences * eval_oov_sentence_fraction))
    if len(covered) < eval_sentences - n_oov:
        raise ValueError(
            f"only {len(covered)} unused sentences are covered by the training sentences' words; "
            f"{eval_sentences - n_oov} were asked for: raise train_sentences or lower eval_sentences"
        )
    eval_pool = covered[: eval_sentences - n_oov] + uncovered[:n_oov]
    random.Random(seed + 1).shuffle(eval_pool)
    used_vocab = sorted({w for s in train_pool + eval_pool for w in words_of(s)})
    return SentencePools(train=train_pool, eval=eval_pool, vocabulary=used_vocab)


def lm_text_sentences(spoken_elsewhere: list[str], directory: Path = FORTUNE_DIR) -> list[str]:
    """The simulated corpus's LM text: the sentences of the text source, as lower-case words, less
    every entry (a whole quotation or joke) that holds a sentence of ``spoken_elsewhere`` (the dev
    and eval pool) or a sentence containing one as a run of words; sentences are compared as word
    sequences, so punctuation and case do not hide one. Sentences of any length are kept.

    In-domain text from the test sets' own source, which a real corpus rarely has: nearly every test
    word is in it (the test sentences use the source's most frequent words), and near-duplicates of a
    test sentence (a word different) may remain. What it does not hold is the test sentences, a
    sentence containing one, or any sentence of an entry (any copy of it) that holds one."""
    held_out = {" ".join(words_of(s)) for s in spoken_elsewhere}
    held_out.discard("")
    by_first: dict[str, list[str]] = {}
    for h in held_out:
        by_first.setdefault(h.split()[0], []).append(f" {h} ")

    def holds_test_sentence(line: str) -> bool:
        padded = f" {line} "
        return any(h in padded for w in set(line.split()) for h in by_first.get(w, ()))

    entries = [[" ".join(words_of(s)) for s in entry] for entry in read_fortune_entries(directory, dedupe=False)]
    # every copy of an entry counts, and a sentence of an entry that holds a test sentence is left out
    # wherever else it occurs too
    left_out = {line for lines in entries if any(holds_test_sentence(x) for x in lines) for line in lines}
    out, seen = [], set(left_out)
    for lines in entries:
        for line in lines:
            if line and line not in seen:
                seen.add(line)
                out.append(line)
    return out
