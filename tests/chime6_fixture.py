"""A tiny corpus in CHiME-6's real layout, written by hand (independent of the simulator), and the
overrides that make the simulator tiny."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

from asr_parallel.corpus import chime6

SR = 16000
TINY_SIMULATION = [
    "corpus.simulation.train_minutes_per_session=0.2",
    "corpus.simulation.eval_minutes_per_session=0.2",
    "corpus.simulation.num_arrays=2",
    "corpus.simulation.train_sentences=200",
    "corpus.simulation.eval_sentences=60",
    "corpus.simulation.vocabulary_size=1000",
    "corpus.simulation.tag_probability=0.2",
    "corpus.simulation.redacted_probability=0.1",
    "tokenizer.vocab_size=60",
]
WORDS = ["hello there", "[laughs] okay so what", "mm yes please", "we should eat", "Pass the salt.",
         "[noise] that is fine"]


def make_fixture_corpus(root: Path, seconds: float = 6.0, arrays: tuple[str, ...] = ("U01", "U02")) -> dict:
    """Write 20 sessions, 4 speakers each, 2 segments per speaker; returns counts for checks."""
    rng = np.random.default_rng(0)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    counts = {"segments": 0, "redacted": 0}
    for part, sessions in chime6.SESSIONS.items():
        for si, session in enumerate(sessions):
            base = 4 * (int(session[1:]) - 1)
            speakers = [f"P{base + k + 1:02d}" for k in range(4)]
            segments = []
            for k, spk in enumerate(speakers):
                tone = 0.1 * np.sin(2 * np.pi * (200 + 50 * k) * t) + 0.01 * rng.standard_normal(n)
                path = chime6.worn_file(root, part, session, spk)
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(path, np.stack([tone, 0.5 * tone], axis=1), SR, subtype="PCM_16")
                for j in range(2):
                    start = 0.2 + 1.4 * k + 0.6 * j
                    words = WORDS[(k + 2 * j + si) % len(WORDS)]
                    if part == "dev" and k == 0 and j == 1:
                        words = "[redacted]"
                        counts["redacted"] += 1
                    seg = {"end_time": chime6.hms(start + 0.5), "start_time": chime6.hms(start), "words": words,
                           "speaker": spk, "session_id": session}
                    if part != "train":
                        seg["ref"] = arrays[k % len(arrays)]
                        seg["location"] = chime6.LOCATIONS[j]
                    segments.append(seg)
            counts["segments"] += len(segments)
            for a in arrays:
                if a in chime6.MISSING_ARRAYS.get(session, set()):
                    continue
                for c in range(1, 5):
                    x = 0.05 * np.sin(2 * np.pi * 300 * t + c) + 0.01 * rng.standard_normal(n)
                    sf.write(chime6.array_file(root, part, session, a, c), x, SR, subtype="PCM_16")
            tpath = chime6.transcript_file(root, part, session)
            tpath.parent.mkdir(parents=True, exist_ok=True)
            tpath.write_text(json.dumps(segments, indent=2))
    return counts
