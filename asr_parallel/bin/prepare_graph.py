"""Stage 4: a word n-gram LM (Kneser-Ney, kaldingram) from the worn-microphone training transcripts
and any extra LM text (stage 3's lm_text.txt, see decode.lm_extra_text), converted with kaldilm, and the CTC decoding graph TLG built with kaldifst (see
asr_parallel.decode.graph). Written to data_dir/lang_bpe_N/: G_{order}gram.arpa, TLG_{order}gram.fst."""

from pathlib import Path

from asr_parallel.stages import parser, run_stage


def graph_paths(cfg) -> tuple[Path, Path]:
    from asr_parallel.tokenizer import lang_dir_name

    lang = Path(cfg.data_dir) / lang_dir_name(cfg.tokenizer)
    return lang / f"G_{cfg.decode.lm_order}gram.arpa", lang / f"TLG_{cfg.decode.lm_order}gram.fst"


def main(argv=None):
    args = parser(4, __doc__).parse_args(argv)

    def work(cfg):
        from asr_parallel.decode.graph import build_graph, train_lm

        arpa, graph = graph_paths(cfg)
        text = arpa.parent / "lm_text.txt"
        if not text.is_file():
            raise FileNotFoundError(f"{text}: missing; run stage 3 (tokenizer) first")
        train_lm(text.read_text(encoding="utf-8").splitlines(), cfg.decode.lm_order, arpa)
        info = build_graph(arpa.parent, arpa, graph)
        info["lm_lines"] = sum(1 for _ in text.open(encoding="utf-8"))
        print(f"{graph}: {info['TLG_states']} states ({info['words']} words, {info['units']} units, "
              f"{cfg.decode.lm_order}-gram LM {arpa.name} from {info['lm_lines']} lines)")
        return info

    run_stage(4, args, ("tokenizer", "decode"), work)


if __name__ == "__main__":
    main()
