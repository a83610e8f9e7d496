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


def compute_fbank(manifest_dir: str | Path, out_dir: str | Path, pairs: list[tuple[str, str]],
                  cfg: FeatureConfig) -> dict:
    """Extract features for every (mic, part) in ``pairs``; returns frames per set."""
    import torch
    from lhotse import Fbank, FbankConfig, LilcomChunkyWriter, load_manifest

    torch.set_num_threads(1)
    manifest_dir, out_dir = Path(manifest_dir), Path(out_dir)
    extractor = Fbank(FbankConfig(num_mel_bins=cfg.num_mel_bins))
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
        cuts = cuts.compute_and_store_features(
            extractor=extractor, storage_path=storage, num_jobs=cfg.num_jobs,
            storage_type=LilcomChunkyWriter,
        )
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
