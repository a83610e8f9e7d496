"""Stage 3: a sentencepiece model over the training transcripts, and Kaldi-style symbol tables.

Outputs in ``data_dir/lang_{model_type}_{vocab_size}`` (icefall's layout, read by graph building):

* ``bpe.model``  the sentencepiece model; ``<blk>`` is id 0 (the CTC blank), ``<sos/eos>`` 1, ``<unk>`` 2;
* ``tokens.txt`` ``piece id`` for every piece;
* ``words.txt``  ``word id``: ``<eps>`` 0, ``!SIL`` 1, ``<UNK>`` 2, the training words in order, then
  ``#0``, ``<s>``, ``</s>`` (disambiguation symbol and sentence boundaries for the grammar);
* ``lexicon.txt`` each word and its pieces;
* ``transcript_words.txt`` the training text the model was trained on.
"""

from __future__ import annotations

import logging
from pathlib import Path

from asr_parallel.config import TokenizerConfig
from asr_parallel.text import training_text
from asr_parallel.utils.io import atomic_dir, atomic_write_text

log = logging.getLogger(__name__)

SPECIAL_PIECES = ["<blk>", "<sos/eos>"]


def lang_dir_name(cfg: TokenizerConfig) -> str:
    return f"lang_{cfg.model_type}_{cfg.vocab_size}"


def write_word_tables(directory: Path, words: list[str], sp) -> None:
    """``words.txt`` (Kaldi's specials around ``words``, in order) and ``lexicon.txt`` (each word and
    its pieces by the sentencepiece model ``sp``) in ``directory``."""
    table = ["<eps>", "!SIL", "<UNK>"] + words + ["#0", "<s>", "</s>"]
    atomic_write_text(directory / "words.txt", "".join(f"{w} {i}\n" for i, w in enumerate(table)))
    atomic_write_text(directory / "lexicon.txt",
                      "".join(f"{w} {' '.join(sp.encode(w, out_type=str))}\n" for w in words))


def train_tokenizer(texts: list[str], out_dir: str | Path, cfg: TokenizerConfig) -> dict:
    """Train on normalised transcripts (event tags are removed first); write the symbol tables."""
    import sentencepiece as spm

    lines = [t for t in (training_text(x) for x in texts) if t]
    if not lines:
        raise ValueError("no training text: every transcript is empty after normalisation")
    words = sorted({w for line in lines for w in line.split()})
    with atomic_dir(out_dir) as tmp:
        text_file = tmp / "transcript_words.txt"
        atomic_write_text(text_file, "\n".join(lines) + "\n")
        spm.SentencePieceTrainer.train(
            input=str(text_file), model_prefix=str(tmp / "bpe"), vocab_size=cfg.vocab_size,
            model_type=cfg.model_type, character_coverage=cfg.character_coverage,
            unk_id=2, bos_id=-1, eos_id=-1, user_defined_symbols=SPECIAL_PIECES,
            hard_vocab_limit=False, num_threads=1, shuffle_input_sentence=False,
            input_sentence_size=10_000_000, minloglevel=2,
        )
        (tmp / "bpe.vocab").unlink(missing_ok=True)
        sp = spm.SentencePieceProcessor(model_file=str(tmp / "bpe.model"))
        pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        atomic_write_text(tmp / "tokens.txt", "".join(f"{p} {i}\n" for i, p in enumerate(pieces)))
        write_word_tables(tmp, words, sp)
    log.info("tokenizer: %d pieces (%s), %d words, %d training lines", len(pieces), cfg.model_type,
             len(words), len(lines))
    return {"pieces": len(pieces), "words": len(words), "lines": len(lines)}
