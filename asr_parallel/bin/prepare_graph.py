"""Stage 4: a word n-gram LM (Kneser-Ney, kaldingram) converted with kaldilm, and the CTC decoding
graph TLG built with kaldifst (see asr_parallel.decode.graph).

The LM's text is the worn-microphone training transcripts (stage 3's ``transcript_words.txt``) and,
by ``decode.lm_extra_text``, extra text (:func:`extra_lm_text`). Transcripts only: the LM and graph
go to stage 3's ``data_dir/lang_bpe_N/`` (G_{order}gram.arpa, TLG_{order}gram.fst) as before. With
extra text they go to a directory of their own, ``data_dir/lang_bpe_N_lmtext_<tag>/`` (``auto``, or
a hash of the file's content), with the LM's own ``words.txt`` and ``lexicon.txt`` (the transcripts'
words and the extra text's, spelled by stage 3's pieces), ``tokens.txt`` and ``lm_text.txt``: each
LM keeps its own graph in one data directory, and a recipe decodes with the one its config names.
"""

import hashlib
from pathlib import Path

from asr_parallel.stages import parser, run_stage


def lm_tag(cfg) -> str:
    """"" for the transcripts only, else the name that tells this LM text's directory apart. ``auto``
    is the simulated corpus's text where the data directory holds a simulated corpus (stage 0 wrote
    its ``sentences.json``), nothing for a real one: decided from the data directory, which every
    stage sees, not from ``--corpus-dir``, which only stages 0-4 get."""
    choice = cfg.decode.lm_extra_text.strip()
    if choice == "none" or (choice == "auto" and not (Path(cfg.data_dir) / "sentences.json").is_file()):
        return ""
    if choice == "auto":
        return "auto"
    path = Path(choice)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: decode.lm_extra_text names no file (or use 'auto' or 'none')")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]  # an edited file is another LM


def graph_marker_suffix(cfg) -> str:
    """Stage 4 keeps one marker per graph directory, so that recipes of one data directory that use
    different LM texts (the default and the comparison recipes) do not rebuild each other's graph."""
    tag = lm_tag(cfg)
    return f"_lmtext_{tag}" if tag else ""


def graph_dir(cfg) -> Path:
    from asr_parallel.tokenizer import lang_dir_name

    tag = lm_tag(cfg)
    return Path(cfg.data_dir) / (lang_dir_name(cfg.tokenizer) + (f"_lmtext_{tag}" if tag else ""))


def graph_paths(cfg) -> tuple[Path, Path]:
    """The ARPA LM and the TLG graph of this config (their directory holds the graph's words.txt)."""
    d = graph_dir(cfg)
    return d / f"G_{cfg.decode.lm_order}gram.arpa", d / f"TLG_{cfg.decode.lm_order}gram.fst"


def extra_lm_text(cfg) -> tuple[list[str], str]:
    """The extra LM lines (normalised words) and where they came from.

    ``auto``: for the simulated corpus, its text source less the entries that hold a dev or eval
    sentence (``data_dir/sentences.json``, written by stage 0; see
    :func:`asr_parallel.corpus.text.lm_text_sentences`); for a real corpus, none. A path: its lines,
    normalised as transcripts are, less any line that holds a dev or eval transcript of three words
    or more as a run of words, or equals a shorter one (a test sentence never reaches the LM)."""
    import json

    from asr_parallel.corpus.text import lm_text_sentences, words_of
    from asr_parallel.text import training_text

    tag = lm_tag(cfg)
    if not tag:
        return [], "none"
    if tag == "auto":
        pools = Path(cfg.data_dir) / "sentences.json"
        if not pools.is_file():
            raise FileNotFoundError(f"{pools}: missing; run stage 0 (corpus) first")
        held_out = json.loads(pools.read_text(encoding="utf-8"))["eval"]
        return lm_text_sentences(held_out), "the simulated corpus's text source less the entries of its dev and eval sentences"
    from lhotse import load_manifest_lazy

    test = set()
    for split in ("dev", "eval"):
        sup = Path(cfg.data_dir) / "manifests" / f"chime6-ihm_supervisions_{split}.jsonl.gz"
        if not sup.is_file():
            raise FileNotFoundError(f"{sup}: missing (the extra LM text is checked against the {split} "
                                    "transcripts); run stage 1 (manifests) first")
        test |= {" ".join(words_of(training_text(s.text))) for s in load_manifest_lazy(sup)}
    test.discard("")
    long_runs = [f" {t} " for t in test if len(t.split()) >= 3]
    path = Path(cfg.decode.lm_extra_text.strip())
    out = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = " ".join(words_of(training_text(raw)))
        if line and line not in test and not any(t in f" {line} " for t in long_runs):
            out.append(line)
    return out, str(path)


def build_lm_lang(cfg, out_dir: Path, extra: list[str]) -> dict:
    """The LM's own lang directory, written whole or not at all (a decoding that reads it meanwhile
    sees the one before): tokens.txt and bpe.model from stage 3, the transcripts' and the extra text's
    words in words.txt and lexicon.txt, lm_text.txt, the LM and the graph. An extra line with a word
    the pieces cannot spell (a character the transcripts lack) is dropped: no output could be that word."""
    import shutil

    import sentencepiece as spm

    from asr_parallel.decode.graph import build_graph, train_lm
    from asr_parallel.tokenizer import lang_dir_name, write_word_tables
    from asr_parallel.utils.io import atomic_dir, atomic_write_text

    lang = Path(cfg.data_dir) / lang_dir_name(cfg.tokenizer)
    sp = spm.SentencePieceProcessor(model_file=str(lang / "bpe.model"))
    transcripts = (lang / "transcript_words.txt").read_text(encoding="utf-8").splitlines()
    spellable: dict[str, bool] = {}

    def can_spell(word: str) -> bool:
        if word not in spellable:
            spellable[word] = all(sp.piece_to_id(p) != sp.unk_id() for p in sp.encode(word, out_type=str))
        return spellable[word]

    kept = [line for line in extra if all(can_spell(w) for w in line.split())]
    words = sorted({w for line in transcripts + kept for w in line.split()})
    with atomic_dir(out_dir) as tmp:
        for name in ("tokens.txt", "bpe.model"):
            shutil.copy2(lang / name, tmp / name)
        write_word_tables(tmp, words, sp)
        atomic_write_text(tmp / "lm_text.txt", "\n".join(transcripts + kept) + "\n")
        arpa, graph = (tmp / p.name for p in graph_paths(cfg))
        train_lm(transcripts + kept, cfg.decode.lm_order, arpa)
        info = build_graph(tmp, arpa, graph)
    return {**info, "lm_lines": len(transcripts) + len(kept), "lm_extra_lines": len(kept),
            "lm_extra_lines_dropped": len(extra) - len(kept)}


def main(argv=None):
    args = parser(4, __doc__).parse_args(argv)

    def work(cfg):
        from asr_parallel.decode.graph import build_graph, train_lm
        from asr_parallel.tokenizer import lang_dir_name

        lang = Path(cfg.data_dir) / lang_dir_name(cfg.tokenizer)
        transcripts = lang / "transcript_words.txt"
        if not transcripts.is_file():
            raise FileNotFoundError(f"{transcripts}: missing; run stage 3 (tokenizer) first")
        arpa, graph = graph_paths(cfg)
        extra, origin = extra_lm_text(cfg)
        info = {"graph_dir": str(graph.parent), "lm_extra_text": origin}
        if graph.parent != lang:
            info |= build_lm_lang(cfg, graph.parent, extra)
        else:  # stage 3's directory: the LM and the graph, each file written atomically
            lines = transcripts.read_text(encoding="utf-8").splitlines()
            info["lm_lines"] = len(lines)
            train_lm(lines, cfg.decode.lm_order, arpa)
            info |= build_graph(graph.parent, arpa, graph)
        print(f"{graph}: {info['TLG_states']} states ({info['words']} words, {info['units']} units, "
              f"{cfg.decode.lm_order}-gram LM {arpa.name} from {info['lm_lines']} lines; extra text: {origin})")
        return info

    # One builder at a time per data directory (stage 8 builds graphs beside runs that read others),
    # and the marker is checked once the lock is held.
    import fcntl

    from asr_parallel.corpus.text import LM_TEXT_VERSION
    from asr_parallel.stages import load

    try:
        data_dir = Path(load(args).data_dir)
    except Exception:  # a bad config: run_stage reports it
        data_dir = None
    lock = None
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = open(data_dir / ".graph.lock", "a")
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        # what the graph depends on: the pieces, the LM order and the LM text (not the search options)
        run_stage(4, args, ("tokenizer",), work,
                  extra_fingerprint=lambda cfg: f"order{cfg.decode.lm_order}:{lm_tag(cfg)}:text{LM_TEXT_VERSION}",
                  marker_suffix=graph_marker_suffix, outputs_exist=lambda cfg: graph_paths(cfg)[1].is_file())
    finally:
        if lock is not None:
            lock.close()


if __name__ == "__main__":
    main()
