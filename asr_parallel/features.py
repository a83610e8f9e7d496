"""Stage 2: 80-dimensional log-mel filterbanks through lhotse, stored lilcom-compressed.

Computed for the supervision cuts of stage 1: worn microphones of train, dev and eval (training and
evaluation) and the reference array channel of dev and eval (evaluation on arrays). Each
(microphone, part) set is its own unit of work with its own completion marker: a killed run
redoes only the sets it had not finished, from scratch, and never leaves a manifest that points at
half-written storage (the cut manifest is written last, atomically).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

from asr_parallel.config import FeatureConfig
from asr_parallel.utils.io import StageMarker, atomic_path

log = logging.getLogger(__name__)


def _file_fingerprint(path: Path, cfg: FeatureConfig) -> str:
    st = path.stat()
    text = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{cfg.num_mel_bins}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _extract_chunk(args) -> list:
    """Worker: features of one chunk of cuts into its own lilcom archive; returns the cuts."""
    cuts, storage, num_mel_bins = args
    import torch
    from lhotse import Fbank, FbankConfig, LilcomChunkyWriter

    torch.set_num_threads(1)
    extractor = Fbank(FbankConfig(num_mel_bins=num_mel_bins))
    with LilcomChunkyWriter(storage) as writer:
        return [cut.compute_and_store_features(extractor, writer) for cut in cuts]


def extract(cuts, storage: Path, num_mel_bins: int, num_jobs: int, desc: str, chunk_size: int = 200):
    """Fbank features of ``cuts`` in ``num_jobs`` processes (forked: no re-import per worker), in chunks
    of ``chunk_size`` cuts, each written to its own archive under ``storage``; a progress bar counts cuts."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from lhotse import CutSet
    from tqdm import tqdm

    storage.mkdir(parents=True, exist_ok=True)
    cuts = list(cuts)
    chunks = [(cuts[i:i + chunk_size], storage / f"feats-{i // chunk_size:05d}", num_mel_bins)
              for i in range(0, len(cuts), chunk_size)]
    out = []
    with tqdm(total=len(cuts), desc=desc, unit="cut") as bar:
        if num_jobs == 1:
            results = map(_extract_chunk, chunks)
            for done in results:
                out += done
                bar.update(len(done))
        else:
            with ProcessPoolExecutor(num_jobs, mp_context=multiprocessing.get_context("fork")) as pool:
                for done in pool.map(_extract_chunk, chunks):
                    out += done
                    bar.update(len(done))
    return CutSet.from_cuts(out)


def compute_fbank(manifest_dir: str | Path, out_dir: str | Path, pairs: list[tuple[str, str]],
                  cfg: FeatureConfig) -> dict:
    """Extract features for every (mic, part) in ``pairs``; returns frames per set."""
    from lhotse import load_manifest

    manifest_dir, out_dir = Path(manifest_dir), Path(out_dir)
    stats = {}
    for mic, part in pairs:
        name = f"chime6-{mic}_cuts_{part}"
        src = manifest_dir / f"{name}.jsonl.gz"
        if not src.is_file():
            raise FileNotFoundError(f"{src}: cut manifest missing; run stage 1 (manifests) first")
        marker = StageMarker(out_dir, f"fbank_{mic}_{part}", _file_fingerprint(src, cfg))
        dst = out_dir / f"{name}.jsonl.gz"
        if marker.is_done() and dst.is_file():
            log.info("%s/%s: features already computed, skipping", mic, part)
            stats[f"{mic}/{part}"] = marker_info(marker)
            continue
        storage = out_dir / f"feats_{mic}_{part}"
        shutil.rmtree(storage, ignore_errors=True)  # a killed earlier run's partial output
        cuts = load_manifest(src)
        log.info("%s/%s: extracting %d-dim fbank for %d cuts with %d job(s)", mic, part,
                 cfg.num_mel_bins, len(cuts), cfg.num_jobs)
        cuts = extract(cuts, storage, cfg.num_mel_bins, cfg.num_jobs, desc=f"fbank {mic}/{part}")
        with atomic_path(dst) as tmp:
            cuts.to_file(tmp)
        frames = sum(c.num_frames for c in cuts)
        marker.mark_done(cuts=len(cuts), frames=frames)
        stats[f"{mic}/{part}"] = {"cuts": len(cuts), "frames": frames}
    return stats


def marker_info(marker: StageMarker) -> dict:
    import json

    info = json.loads(marker.path.read_text())
    return {"cuts": info.get("cuts"), "frames": info.get("frames")}
