"""Stage 3: sentencepiece model on the worn-microphone training transcripts, with Kaldi-style
tokens.txt, words.txt and lexicon.txt (see asr_parallel.tokenizer)."""

from pathlib import Path

from asr_parallel.stages import parser, run_stage


def main(argv=None):
    args = parser(3, __doc__).parse_args(argv)

    def work(cfg):
        from lhotse import load_manifest_lazy

        from asr_parallel.tokenizer import lang_dir_name, train_tokenizer

        src = Path(cfg.data_dir) / "manifests" / "chime6-ihm_cuts_train.jsonl.gz"
        if not src.is_file():
            raise FileNotFoundError(f"{src}: training cuts missing; run stage 1 (manifests) first")
        texts = [c.supervisions[0].text for c in load_manifest_lazy(src)]
        out = Path(cfg.data_dir) / lang_dir_name(cfg.tokenizer)
        info = train_tokenizer(texts, out, cfg.tokenizer)
        print(f"{out}: {info['pieces']} pieces, {info['words']} words from {info['lines']} training lines")
        return info

    run_stage(3, args, ("tokenizer",), work)


if __name__ == "__main__":
    main()
