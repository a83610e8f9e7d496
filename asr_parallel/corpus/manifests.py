"""Stage 1: lhotse manifests of a CHiME-6 copy (real or simulated; nothing here tells them apart).

For each microphone condition and part, lhotse's CHiME-6 recipe (never with array synchronisation or
md5 checks: both download from the internet) gives recordings and supervisions with Kaldi text
normalisation. Then, as Kaldi's ``json2text.py`` does, segments whose normalised text is empty
(``[redacted]``, empty words) are dropped with a count, and one mono supervision cut per segment is
made:

* ``ihm`` (worn): the speaker's own binaural microphone, channel ``features.worn_channel``;
* ``mdm`` (arrays): on dev and eval the segment's reference array (its ``ref`` field), channel
  ``features.reference_channel``; enhancement across channels comes later.

Outputs in ``data_dir/manifests``: ``chime6-{mic}_{recordings,supervisions,cuts}_{part}.jsonl.gz``
and ``summary.json``. The directory is replaced as a whole when the stage succeeds, so a failure
leaves the previous manifests untouched.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from asr_parallel.config import RecipeConfig
from asr_parallel.corpus import chime6
from asr_parallel.utils.io import atomic_dir, atomic_write_json

log = logging.getLogger(__name__)


class CorpusError(RuntimeError):
    """The corpus is missing files or holds malformed ones; the message names each."""


def mic_parts(cfg: RecipeConfig) -> list[tuple[str, str]]:
    """(mic, part) pairs that the recipe prepares."""
    pairs = []
    for mic in cfg.manifests.mics:
        parts = chime6.PARTS if mic == "ihm" else [p for p in chime6.PARTS if p in cfg.manifests.mdm_parts]
        pairs += [(mic, part) for part in parts]
    return pairs


def utterance_id(speaker: str, session: str, device: str, start: float, end: float) -> str:
    """Kaldi-style ``P05_S02_U01-0001234-0001300`` (times in centiseconds), sortable by speaker."""
    return f"{speaker}_{session}_{device}-{int(round(start * 100)):07d}-{int(round(end * 100)):07d}"


def supervision_cuts(recordings, supervisions, mic: str, worn_channel: int, reference_channel: int):
    """One mono cut per supervision on the chosen channel."""
    from lhotse import CutSet, MonoCut

    cuts = []
    for sup in supervisions:
        rec = recordings[sup.recording_id]
        channels = sup.channel if isinstance(sup.channel, list) else [sup.channel]
        if mic == "ihm":
            channel = channels[worn_channel]
            device = "ihm"
        else:
            # channels: the reference array's CH1..CH4 (dev/eval) or every array channel (train).
            channel = channels[reference_channel]
            device = Path(rec.sources[channel].source).name.split("_")[1].split(".")[0]
        cut_id = utterance_id(sup.speaker, sup.recording_id, device, sup.start, sup.end)
        cut_sup = dataclasses.replace(sup, id=cut_id, channel=channel, start=0.0)
        cuts.append(MonoCut(id=cut_id, start=sup.start, duration=sup.duration, channel=channel,
                            recording=rec, supervisions=[cut_sup]))
    return CutSet.from_cuts(cuts)


def prepare_manifests(corpus: str | Path, out_dir: str | Path, cfg: RecipeConfig, num_jobs: int = 1) -> dict:
    """Check the corpus, then write all manifests; returns the per-split summary."""
    from lhotse import validate
    from lhotse.recipes.chime6 import prepare_chime6

    corpus, out_dir = Path(corpus), Path(out_dir)
    pairs = mic_parts(cfg)
    need_arrays = tuple(part for mic, part in pairs if mic == "mdm")
    report = chime6.check_corpus(corpus, parts=chime6.PARTS, need_arrays=need_arrays)
    if not report.ok:
        raise CorpusError(report.message(corpus))
    for reason, n in report.skipped.items():
        log.warning("%d segment(s) will be skipped: %s", n, reason)

    summary: dict = {"skipped": dict(report.skipped), "splits": {}}
    with atomic_dir(out_dir) as tmp:
        for mic, part in pairs:
            m = prepare_chime6(corpus, output_dir=None, dataset_parts=[part], mic=mic,
                               use_reference_array=(mic == "mdm" and part != "train"),
                               perform_array_sync=False, verify_md5_checksums=False,
                               num_jobs=num_jobs, normalize_text="kaldi")[part]
            recordings, supervisions = m["recordings"], m["supervisions"]
            n_all = len(supervisions)
            supervisions = supervisions.filter(lambda s: bool(s.text and s.text.strip()))
            dropped = n_all - len(supervisions)
            cuts = supervision_cuts(recordings, supervisions, mic, cfg.features.worn_channel,
                                    cfg.features.reference_channel).sort_by_recording_id()
            for cut in cuts:
                validate(cut)
            recordings.to_file(tmp / f"chime6-{mic}_recordings_{part}.jsonl.gz")
            supervisions.to_file(tmp / f"chime6-{mic}_supervisions_{part}.jsonl.gz")
            cuts.to_file(tmp / f"chime6-{mic}_cuts_{part}.jsonl.gz")
            words = sum(len(c.supervisions[0].text.split()) for c in cuts)
            summary["splits"][f"{mic}/{part}"] = {
                "recordings": len(recordings),
                "channels": sum(r.num_channels for r in recordings),
                "utterances": len(cuts),
                "dropped_empty_text": dropped,
                "hours": round(sum(c.duration for c in cuts) / 3600, 3),
                "speakers": len({c.supervisions[0].speaker for c in cuts}),
                "words": words,
            }
            log.info("%s/%s: %d utterances, %.2f h, %d dropped (empty text after normalisation)",
                     mic, part, len(cuts), summary["splits"][f"{mic}/{part}"]["hours"], dropped)
        atomic_write_json(tmp / "summary.json", summary)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"{'split':12} {'recs':>5} {'utts':>6} {'hours':>6} {'spk':>4} {'words':>7} {'dropped':>7}"]
    for name, s in summary["splits"].items():
        lines.append(f"{name:12} {s['recordings']:5d} {s['utterances']:6d} {s['hours']:6.2f} {s['speakers']:4d} "
                     f"{s['words']:7d} {s['dropped_empty_text']:7d}")
    if summary.get("skipped"):
        lines.append("skipped segments: " + ", ".join(f"{n} ({r})" for r, n in summary["skipped"].items()))
    return "\n".join(lines)
