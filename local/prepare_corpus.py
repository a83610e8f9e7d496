#!/usr/bin/env python3
"""Stage 0: the corpus.

Without a corpus directory (``--corpus-dir`` or ``corpus.dir`` in the config): generate the
simulated CHiME-6 corpus under ``data_dir/corpus`` (see asr_parallel.corpus.simulate), resuming an
interrupted generation session by session, and print its totals.
With one: check that it has CHiME-6's layout and stop with a list of what is missing or malformed.
"""

from pathlib import Path

from asr_parallel.corpus import chime6
from asr_parallel.stages import corpus_dir, parser, run_stage


def main(argv=None):
    p = parser(0, __doc__)
    p.add_argument("--num-jobs", type=int, default=2, help="sessions generated in parallel")
    args = p.parse_args(argv)

    def work(cfg):
        corpus = corpus_dir(cfg)
        if cfg.corpus.dir:
            mdm_parts = tuple(cfg.manifests.mdm_parts) if "mdm" in cfg.manifests.mics else ()
            report = chime6.check_corpus(corpus, need_arrays=mdm_parts)
            if not report.ok:
                raise RuntimeError(report.message(corpus))
            print(f"CHiME-6 corpus at {corpus}: layout complete, {report.segments} usable segments"
                  + "".join(f"; {n} to skip ({r})" for r, n in report.skipped.items()))
            # a simulated corpus's own files in this data directory (an earlier simulated run) would
            # make stage 4 take its text as this corpus's LM text (decode.lm_extra_text auto)
            for name in ("sentences.json", "voices.json"):
                stale = Path(cfg.data_dir) / name
                if stale.is_file():
                    stale.unlink()
                    print(f"{stale}: removed (the simulated corpus's, not this corpus's)")
            return {"segments": report.segments}
        from asr_parallel.corpus.simulate import format_summary, simulate_corpus

        summary = simulate_corpus(corpus, cfg.data_dir, cfg.corpus.simulation, num_jobs=args.num_jobs)
        print(f"simulated CHiME-6 corpus at {corpus}:\n" + format_summary(summary))
        return {"disk_mb": summary["total_disk_mb"]}

    run_stage(0, args, ("corpus",), work)


if __name__ == "__main__":
    main()
