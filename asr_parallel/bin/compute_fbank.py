"""Stage 2: log-mel filterbank features for the cuts of stage 1 (see asr_parallel.features)."""

from pathlib import Path

from asr_parallel.stages import parser, run_stage


def main(argv=None):
    args = parser(2, __doc__).parse_args(argv)

    def work(cfg):
        from asr_parallel.corpus.manifests import mic_parts
        from asr_parallel.features import compute_fbank

        stats = compute_fbank(Path(cfg.data_dir) / "manifests", Path(cfg.data_dir) / "fbank", mic_parts(cfg),
                              cfg.features)
        for name, s in stats.items():
            print(f"{name:12} {s['cuts']:6d} cuts {s['frames'] / 100 / 3600:7.2f} h of frames")
        return {}

    run_stage(2, args, ("features", "manifests"), work)


if __name__ == "__main__":
    main()
