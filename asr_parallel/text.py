"""Text normalisation for training and for CHiME-6 scoring.

Transcripts reach the recipe already normalised Kaldi-style by lhotse (lowercase, ``.?,:;!``
removed, ``[inaudible 0:12:34.56]`` collapsed to ``[inaudible]``, ``mm-`` to ``mm``, and an empty
text for ``[redacted]`` segments, which stage 1 drops).

* :func:`training_text`: the units a model is trained on: words only, bracketed event tags
  ([noise], [laughs], [inaudible]) removed, since they are not words and scoring ignores them.
* :func:`scoring_text`: the CHiME-6 track-1 scoring rules (Watanabe et al. 2020; Kaldi's
  ``local/wer_output_filter``), applied to reference and hypothesis alike: lowercase, drop every
  bracketed token, map the hesitations ``mm``, ``mhm`` and ``mmm`` to ``hmm``; segments containing
  ``[redacted]`` are excluded (``None``).
"""

from __future__ import annotations

import re

_BRACKETED = re.compile(r"\[[^\]]*\]")
_HESITATIONS = {"mm": "hmm", "mhm": "hmm", "mmm": "hmm"}


def training_text(text: str) -> str:
    return " ".join(_BRACKETED.sub(" ", text).split())


def scoring_text(text: str) -> str | None:
    if "[redacted]" in text.lower():
        return None
    words = _BRACKETED.sub(" ", text.lower()).split()
    return " ".join(_HESITATIONS.get(w, w) for w in words)
