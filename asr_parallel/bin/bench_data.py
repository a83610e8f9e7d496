"""Benchmark of data preparation on this machine: corpus simulation speed (hours of audio generated
per minute of wall-clock) and feature-extraction real-time factor (seconds of compute per second of
audio, lower is faster). Prints the figures and writes them as JSON.

Both are measured in one run on freshly generated sessions; nothing from data/ is used.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

from asr_parallel.utils.io import atomic_write_json


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="recipes/chime6_sim.yaml")
    p.add_argument("--minutes", type=float, default=3.0, help="minutes of conversation per generated session")
    p.add_argument("--sessions", default="S03,S02", help="sessions to generate (train has no arrays by default)")
    p.add_argument("--output", default="exp/bench/data_prep.json")
    args = p.parse_args(argv)

    import soundfile as sf
    import torch
    from lhotse import Fbank, FbankConfig, LilcomChunkyWriter, Recording

    from asr_parallel.config import load_config
    from asr_parallel.corpus import chime6
    from asr_parallel.corpus.simulate import assign_voices, generate_session
    from asr_parallel.corpus.text import sentence_pools

    torch.set_num_threads(1)
    sim = load_config(args.config, [f"corpus.simulation.train_minutes_per_session={args.minutes}",
                                    f"corpus.simulation.eval_minutes_per_session={args.minutes}"]).corpus.simulation
    results: dict = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}",
                     "torch_threads": 1, "sessions": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        voices = assign_voices(sim)
        pools = sentence_pools(sim.train_sentences, sim.eval_sentences, sim.vocabulary_size, sim.min_words,
                               sim.max_words, sim.seed)
        for session in args.sessions.split(","):
            part = chime6.part_of(session)
            t0 = time.perf_counter()
            stats = generate_session(tmp / "corpus", session, sim, voices,
                                     pools.train if part == "train" else pools.eval, tmp)
            wall = time.perf_counter() - t0
            channels = 8 + 4 * len(stats["arrays"])
            results["sessions"][session] = {
                "seconds_of_session": round(stats["seconds"], 1), "channels": channels, "wall_seconds": round(wall, 2),
                "session_hours_per_minute": round(stats["seconds"] / 3600 / (wall / 60), 3),
                "channel_hours_per_minute": round(channels * stats["seconds"] / 3600 / (wall / 60), 2),
            }
        # Feature extraction: 80-dim fbank of one worn channel, 10 s chunks, stored with lilcom.
        path = next((tmp / "corpus" / "audio" / "train").glob("*_P*.wav"))
        rec = Recording.from_file(path)
        extractor = Fbank(FbankConfig(num_mel_bins=80))
        audio = rec.load_audio(channels=0)[0]
        chunk = 10 * 16000
        t0 = time.perf_counter()
        with LilcomChunkyWriter(tmp / "feats") as writer:
            for i in range(0, len(audio) - chunk + 1, chunk):
                feats = extractor.extract(audio[i:i + chunk], 16000)
                writer.write(f"c{i}", feats)
        wall = time.perf_counter() - t0
        seconds = (len(audio) // chunk) * 10
        results["features"] = {"audio_seconds": seconds, "wall_seconds": round(wall, 3),
                               "real_time_factor": round(wall / seconds, 5), "files": sf.info(path).channels}
    for s, r in results["sessions"].items():
        print(f"simulation {s}: {r['seconds_of_session']:.0f} s of session, {r['channels']} channels in "
              f"{r['wall_seconds']:.1f} s = {r['session_hours_per_minute']:.2f} h of audio per minute "
              f"({r['channel_hours_per_minute']:.1f} channel-hours per minute)")
    f = results["features"]
    print(f"features: 80-dim fbank + lilcom of {f['audio_seconds']} s in {f['wall_seconds']:.2f} s, "
          f"real-time factor {f['real_time_factor']:.4f} (1 thread)")
    atomic_write_json(args.output, results)
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
