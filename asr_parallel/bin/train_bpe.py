"""Stage 3: sentencepiece model on the worn-microphone training transcripts, with Kaldi-style
tokens.txt, words.txt and lexicon.txt, and the word LM's text (see asr_parallel.tokenizer):
the transcripts and, by ``decode.lm_extra_text``, extra text (see :func:`extra_lm_text`)."""

from pathlib import Path

from asr_parallel.stages import parser, run_stage


def extra_lm_text(cfg) -> tuple[list[str], str]:
    """The extra LM lines (normalised words) and where they came from.

    ``auto``: for the simulated corpus, its text source less the dev and eval sentence pool
    (``data_dir/sentences.json``, written by stage 0); for a real corpus, none. A path: its lines,
    normalised as transcripts are, less any line equal to a dev or eval transcript (so that a test
    sentence never reaches the LM)."""
    import json

    from asr_parallel.corpus.text import lm_text_sentences, words_of
    from asr_parallel.text import training_text

    choice = cfg.decode.lm_extra_text.strip()
    if choice == "none":
        return [], "none"
    if choice == "auto":
        if cfg.corpus.dir:
            return [], "none (a real corpus ships no LM text: decode.lm_extra_text names a file)"
        pools = Path(cfg.data_dir) / "sentences.json"
        if not pools.is_file():
            raise FileNotFoundError(f"{pools}: missing; run stage 0 (corpus) first")
        held_out = json.loads(pools.read_text(encoding="utf-8"))["eval"]
        return lm_text_sentences(held_out), "the simulated corpus's text source less its dev and eval sentences"
    path = Path(choice)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: decode.lm_extra_text names no file (or use 'auto' or 'none')")
    test = set()
    for split in ("dev", "eval"):
        sup = Path(cfg.data_dir) / "manifests" / f"chime6-ihm_supervisions_{split}.jsonl.gz"
        if sup.is_file():
            from lhotse import load_manifest_lazy

            test |= {" ".join(words_of(training_text(s.text))) for s in load_manifest_lazy(sup)}
    lines = [" ".join(words_of(training_text(x))) for x in path.read_text(encoding="utf-8").splitlines()]
    return [x for x in lines if x and x not in test], str(path)


def main(argv=None):
    args = parser(3, __doc__).parse_args(argv)

    def work(cfg):
        from lhotse import load_manifest_lazy

        from asr_parallel.tokenizer import lang_dir_name, train_tokenizer

        src = Path(cfg.data_dir) / "manifests" / "chime6-ihm_cuts_train.jsonl.gz"
        if not src.is_file():
            raise FileNotFoundError(f"{src}: training cuts missing; run stage 1 (manifests) first")
        texts = [c.supervisions[0].text for c in load_manifest_lazy(src)]
        extra, origin = extra_lm_text(cfg)
        out = Path(cfg.data_dir) / lang_dir_name(cfg.tokenizer)
        info = train_tokenizer(texts, out, cfg.tokenizer, extra)
        print(f"{out}: {info['pieces']} pieces, {info['words']} words from {info['lines']} training lines "
              f"and {info['lm_extra_lines']} extra LM lines ({origin})")
        return info

    run_stage(3, args, ("tokenizer", "decode.lm_extra_text"), work)


if __name__ == "__main__":
    main()
