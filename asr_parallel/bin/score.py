"""Stage 7: WER by CHiME-6 track-1 rules for every decoding of the experiment, per split and
microphone condition with a breakdown per session and location (Kaldi-style), written to
EXP/wer_report.txt and EXP/results.json; prints the final table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from asr_parallel.config import ConfigError, load_config
from asr_parallel.stages import experiment_parser
from asr_parallel.utils.logging import setup_logging


def main(argv=None):
    p = experiment_parser(__doc__)
    args = p.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        from asr_parallel.bin.train import experiment_dir
        from asr_parallel.score.report import (
            score_experiment,
            summary_table,
            write_report,
        )

        exp = Path(args.exp_dir) if args.exp_dir else experiment_dir(cfg)
        decode_dir = exp / "decode"
        if not decode_dir.is_dir():
            raise FileNotFoundError(f"{decode_dir}: nothing decoded; run stage 6 (decode) first")
        results, report = score_experiment(decode_dir)
        extra = {}
        for name in ("train_summary.json", "decode/timing.json"):
            path = exp / name
            if path.is_file():
                data = json.loads(path.read_text())
                extra[name.split("/")[-1].removesuffix(".json")] = (
                    {k: v for k, v in data.items() if k != "history"} if name == "train_summary.json" else data)
        write_report(exp, results, report, extra)
        print(report)
        print(f"\n{exp}\n" + summary_table(results))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"ERROR: stage 7 (score): {e}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
