"""Language model and CTC decoding graph (TLG) with kaldingram, kaldilm and kaldifst.

* G: a word n-gram LM with Kneser-Ney smoothing estimated from the LM text (stage 4: the training transcripts and any extra text) by
  kaldingram (the Next-gen Kaldi team's port of Kaldi's ``make_kn_lm.py``), converted to an FST by
  kaldilm's ``arpa2fst`` with ``#0`` on the input side of back-off arcs (Kaldi's convention).
* L: the lexicon of BPE pieces (``lexicon.txt`` of stage 3, or of the LM text's own directory), a transducer from piece sequences to
  words. Piece sequences that are a prefix of another word's (or equal to it) get a disambiguation
  symbol ``#1, #2, ...`` appended, as Kaldi's ``add_lex_disambig.pl`` does, so L o G determinizes; a
  ``#0`` self-loop lets G's back-off symbol through.
* LG = minimize(determinize(L o G)), then the disambiguation symbols become epsilons.
* T: the CTC topology (Graves et al. 2006; as icefall's ``build_standard_ctc_topo``): one state per
  unit (state 0 = blank); reading unit k in state i goes to state k and outputs k unless k repeats i
  or is blank. TLG = T o LG.

Labels: in every FST here, a BPE unit with id u (0 = blank) is label u + 1, since label 0 is the
FST epsilon; the decoder maps label l back to column l - 1 of the network's output. Words carry their
ids of ``words.txt``.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)


def read_symbols(path: Path) -> dict[str, int]:
    table = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            sym, idx = line.rsplit(" ", 1)
            table[sym] = int(idx)
    return table


def train_lm(text_lines: list[str], order: int, arpa_path: Path) -> None:
    """Kneser-Ney n-gram LM of ``order`` in ARPA format (kaldingram)."""
    import tempfile

    from kaldingram import train as kn_train

    from asr_parallel.utils.io import atomic_path

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write("\n".join(text_lines) + "\n")
        text_file = f.name
    with atomic_path(arpa_path) as tmp:
        kn_train.main(["--ngram-order", str(order), "--text", text_file, "--lm", str(tmp)])
    Path(text_file).unlink()


def lexicon_with_disambig(lexicon: list[tuple[str, list[str]]]) -> tuple[list[tuple[str, list[str]]], int]:
    """Append #1, #2, ... to piece sequences that equal or prefix another's; returns the count used."""
    seqs = [tuple(p) for _, p in lexicon]
    prefixes = set()
    for s in set(seqs):
        for i in range(1, len(s)):
            prefixes.add(s[:i])
    seen: dict[tuple, int] = {}
    count = Counter(seqs)
    out, max_disambig = [], 0
    for (word, pieces), s in zip(lexicon, seqs):
        if s in prefixes or count[s] > 1:
            seen[s] = seen.get(s, 0) + 1
            pieces = list(pieces) + [f"#{seen[s]}"]
            max_disambig = max(max_disambig, seen[s])
        out.append((word, list(pieces)))
    return out, max_disambig


def build_lexicon_fst(lexicon, token_label: dict[str, int], word_id: dict[str, int], token_disambig0: int,
                      word_disambig0: int):
    import kaldifst

    fst = kaldifst.StdVectorFst()
    start = fst.add_state()
    fst.start = start
    fst.set_final(start, 0.0)
    for word, pieces in lexicon:
        src = start
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            dst = start if last else fst.add_state()
            fst.add_arc(src, kaldifst.StdArc(token_label[piece], word_id[word] if i == 0 else 0, 0.0, dst))
            src = dst
    fst.add_arc(start, kaldifst.StdArc(token_disambig0, word_disambig0, 0.0, start))
    return fst


def build_ctc_topo(num_units: int):
    """T: units 0..num_units-1 (0 = blank) as labels 1..num_units."""
    import kaldifst

    fst = kaldifst.StdVectorFst()
    for _ in range(num_units):
        s = fst.add_state()
        fst.set_final(s, 0.0)
    fst.start = 0
    for i in range(num_units):
        for k in range(num_units):
            out = 0 if (k == 0 or k == i) else k + 1
            fst.add_arc(i, kaldifst.StdArc(k + 1, out, 0.0, k))
    return fst


def build_graph(lang_dir: Path, arpa_path: Path, out_path: Path) -> dict:
    """TLG.fst from ``lang_dir`` (tokens.txt, words.txt, lexicon.txt) and an ARPA LM."""
    import kaldifst
    import kaldilm

    from asr_parallel.utils.io import atomic_path

    tokens = read_symbols(lang_dir / "tokens.txt")
    words = read_symbols(lang_dir / "words.txt")
    lexicon = []
    for line in (lang_dir / "lexicon.txt").read_text(encoding="utf-8").splitlines():
        word, *pieces = line.split()
        lexicon.append((word, pieces))
    lexicon, max_disambig = lexicon_with_disambig(lexicon)
    num_units = len(tokens)
    token_label = {t: i + 1 for t, i in tokens.items()}
    for d in range(max_disambig + 1):  # #0 .. #max after the units
        token_label[f"#{d}"] = num_units + 1 + d
    g_text = kaldilm.arpa2fst(str(arpa_path), disambig_symbol="#0", read_symbol_table=str(lang_dir / "words.txt"))
    G = kaldifst.compile(g_text, acceptor=False)
    L = build_lexicon_fst(lexicon, token_label, words, token_label["#0"], words["#0"])
    kaldifst.arcsort(L, sort_type="olabel")
    kaldifst.arcsort(G, sort_type="ilabel")
    LG = kaldifst.compose(L, G)
    kaldifst.determinize_star(LG)
    kaldifst.minimize_encoded(LG)
    # Disambiguation symbols become epsilons now that LG is deterministic.
    first_disambig = num_units + 1
    LG = _relabel_inputs(LG, first_disambig)
    kaldifst.rmepsilon(LG)
    kaldifst.arcsort(LG, sort_type="ilabel")
    T = build_ctc_topo(num_units)
    kaldifst.arcsort(T, sort_type="olabel")
    TLG = kaldifst.compose(T, LG)
    kaldifst.arcsort(TLG, sort_type="ilabel")
    with atomic_path(out_path) as tmp:
        TLG.write(str(tmp))
    info = {"units": num_units, "words": len(words), "disambig": max_disambig + 1,
            "LG_states": LG.num_states, "TLG_states": TLG.num_states}
    log.info("graph %s: %s", out_path, info)
    return info


def _relabel_inputs(fst, first_disambig: int):
    """A copy of ``fst`` with input labels >= first_disambig replaced by epsilon."""
    import kaldifst

    out = kaldifst.StdVectorFst()
    for _ in range(fst.num_states):
        out.add_state()
    out.start = fst.start
    for s in range(fst.num_states):
        w = fst.final(s)
        if w != kaldifst.TropicalWeight.zero:
            out.set_final(s, w)
        for arc in kaldifst.ArcIterator(fst, s):
            il = 0 if arc.ilabel >= first_disambig else arc.ilabel
            out.add_arc(s, kaldifst.StdArc(il, arc.olabel, arc.weight, arc.nextstate))
    return out
