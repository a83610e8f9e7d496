"""What the recipe's stage entry points share: options, config loading, markers, error reporting.

Every stage records a completion marker under ``data_dir/.done`` holding a fingerprint of its
inputs: the config sections it reads and the fingerprint of the stage it builds on. Re-running a
finished stage with the same inputs skips it; a changed config or a redone upstream stage redoes
it. Expected failures (bad config, bad corpus) end with one ``ERROR:`` line naming the stage and
the cause, and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable

from asr_parallel.config import ConfigError, RecipeConfig, add_config_args, load_config
from asr_parallel.utils.io import StageMarker
from asr_parallel.utils.logging import setup_logging

log = logging.getLogger("asr_parallel.stage")

# Stage number -> (name, what it does); run.sh --help prints this list.
STAGES = {
    0: ("corpus", "generate the simulated CHiME-6 corpus, or check a real copy (--corpus-dir)"),
    1: ("manifests", "lhotse manifests and supervision cuts per split and microphone"),
    2: ("features", "80-dim log-mel filterbanks (lilcom) for worn and array microphones"),
    3: ("tokenizer", "sentencepiece BPE and Kaldi-style tokens.txt / words.txt / lexicon.txt"),
    4: ("graph", "word n-gram LM from the training transcripts (and extra LM text) and the TLG decoding graph"),
    5: ("train", "train the acoustic model with the configured strategy (torchrun for world_size > 1)"),
    6: ("decode", "greedy and WFST decoding of dev and eval, worn and array microphones"),
    7: ("score", "WER by CHiME-6 rules per split, microphone, session and location; results.json"),
}
UPSTREAM = {1: 0, 2: 1, 3: 1, 4: 3}


def parser(stage: int, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"stage {stage} ({STAGES[stage][0]})", description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--corpus-dir", default=None,
                   help="a real CHiME-6 copy; overrides corpus.dir (without either: the simulated corpus)")
    p.add_argument("--force", action="store_true", help="redo the stage even if it is marked done")
    return p


def experiment_parser(description: str, **extra) -> argparse.ArgumentParser:
    """Options of the experiment stages (5-7, benchmarks): the config, and the experiment directory."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_args(p)
    p.add_argument("--exp-dir", default=None, help="experiment directory (default: derived from the config)")
    return p


def load(args) -> RecipeConfig:
    overrides = list(args.overrides)
    if args.corpus_dir:
        overrides.append(f"corpus.dir={Path(args.corpus_dir).resolve()}")
    return load_config(args.config, overrides)


def corpus_dir(cfg: RecipeConfig) -> Path:
    return Path(cfg.corpus.dir) if cfg.corpus.dir else Path(cfg.data_dir) / "corpus"


def marker(cfg: RecipeConfig, stage: int, sections: tuple[str, ...], extra: str = "", suffix: str = "") -> StageMarker:
    upstream = ""
    if stage in UPSTREAM:
        up = UPSTREAM[stage]
        path = Path(cfg.data_dir) / ".done" / f"stage{up}_{STAGES[up][0]}.done"
        try:
            upstream = json.loads(path.read_text())["fingerprint"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            upstream = "missing"
    text = cfg.fingerprint(*sections) + upstream + str(corpus_dir(cfg).resolve()) + extra
    return StageMarker(cfg.data_dir, f"stage{stage}_{STAGES[stage][0]}{suffix}",
                       hashlib.sha256(text.encode()).hexdigest()[:16])


def run_stage(stage: int, args, sections: tuple[str, ...], work: Callable[[RecipeConfig], dict | None],
              extra_fingerprint: Callable[[RecipeConfig], str] | None = None,
              marker_suffix: Callable[[RecipeConfig], str] | None = None,
              outputs_exist: Callable[[RecipeConfig], bool] | None = None) -> None:
    """Load the config, skip if done, run ``work`` and mark done; expected errors exit with a message.
    ``extra_fingerprint`` adds what the config's sections do not show (a named file's content);
    ``marker_suffix`` names one of several markers of the stage (one per output directory);
    ``outputs_exist`` false redoes a stage marked done whose outputs are gone."""
    setup_logging()
    name = STAGES[stage][0]
    try:
        cfg = load(args)
        if stage in UPSTREAM:
            up = UPSTREAM[stage]
            if not (Path(cfg.data_dir) / ".done" / f"stage{up}_{STAGES[up][0]}.done").is_file():
                raise RuntimeError(f"stage {up} ({STAGES[up][0]}) has not finished; run it first")
        m = marker(cfg, stage, sections, extra_fingerprint(cfg) if extra_fingerprint else "",
                   marker_suffix(cfg) if marker_suffix else "")
        if m.is_done() and not args.force and (outputs_exist is None or outputs_exist(cfg)):
            log.info("stage %d (%s) already done with these inputs (%s); skipping", stage, name, m.path)
            return
        t0 = time.time()
        info = work(cfg) or {}
        m.mark_done(seconds=round(time.time() - t0, 1), **info)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"ERROR: stage {stage} ({name}): {e}", file=sys.stderr)
        raise SystemExit(1)
