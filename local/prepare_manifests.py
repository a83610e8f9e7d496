#!/usr/bin/env python3
"""Stage 1: lhotse manifests of the CHiME-6 corpus (worn and array microphones), Kaldi text
normalisation, validation, one supervision cut per segment, and a summary per split and microphone.
Written to data_dir/manifests, replaced as a whole only when everything succeeded."""

from pathlib import Path

from asr_parallel.stages import corpus_dir, parser, run_stage


def main(argv=None):
    p = parser(1, __doc__)
    p.add_argument("--num-jobs", type=int, default=1, help="lhotse preparation jobs")
    args = p.parse_args(argv)

    def work(cfg):
        from asr_parallel.corpus.manifests import CorpusError, format_summary, prepare_manifests

        try:
            summary = prepare_manifests(corpus_dir(cfg).resolve(), Path(cfg.data_dir) / "manifests", cfg,
                                        num_jobs=args.num_jobs)
        except CorpusError as e:
            raise RuntimeError(str(e)) from None
        print(format_summary(summary))
        return {}

    run_stage(1, args, ("corpus", "manifests", "features"), work)


if __name__ == "__main__":
    main()
