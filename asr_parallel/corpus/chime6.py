"""CHiME-6 corpus layout: sessions, file names, transcript schema, and a checker.

CHiME-6 (Watanabe et al., "CHiME-6 Challenge: Tackling multispeaker speech recognition for
unsegmented recordings", 2020) holds 20 dinner-party sessions of 4 participants each. Layout::

    CORPUS/audio/{train,dev,eval}/S02_P05.wav        worn binaural microphone of P05 (2 channels)
    CORPUS/audio/{train,dev,eval}/S02_U01.CH1.wav    far-field array U01, channel 1 (mono), CH1..CH4
    CORPUS/transcriptions/{train,dev,eval}/S02.json  list of segments

A transcript segment::

    {"end_time": "0:01:15.10", "start_time": "0:01:13.42", "words": "...", "speaker": "P05",
     "session_id": "S02", "ref": "U02", "location": "kitchen"}     (ref, location: dev and eval only)

The checker below is what stage 0 runs on a real copy, and what stage 1 runs before handing the
corpus to lhotse: it reports every problem it finds at once, each naming its file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf

SESSIONS: dict[str, list[str]] = {
    "train": ["S03", "S04", "S05", "S06", "S07", "S08", "S12", "S13",
              "S16", "S17", "S18", "S19", "S20", "S22", "S23", "S24"],
    "dev": ["S02", "S09"],
    "eval": ["S01", "S21"],
}
PARTS = tuple(SESSIONS)
ARRAYS = [f"U0{i}" for i in range(1, 7)]
CHANNELS_PER_ARRAY = 4
# Arrays that the real corpus lacks (a device failed during recording).
MISSING_ARRAYS = {"S01": {"U03"}, "S05": {"U04"}}
LOCATIONS = ("kitchen", "dining", "living")
SAMPLE_RATE = 16000

_TIME = re.compile(r"^\d+:\d{2}:\d{2}(\.\d+)?$")
_SPEAKER = re.compile(r"^P\d{2}$")


def part_of(session: str) -> str:
    for part, sessions in SESSIONS.items():
        if session in sessions:
            return part
    raise KeyError(f"{session} is not a CHiME-6 session")


def worn_file(corpus: Path, part: str, session: str, speaker: str) -> Path:
    return Path(corpus) / "audio" / part / f"{session}_{speaker}.wav"


def array_file(corpus: Path, part: str, session: str, array: str, channel: int) -> Path:
    """``channel`` counts from 1, as in the file names (CH1..CH4)."""
    return Path(corpus) / "audio" / part / f"{session}_{array}.CH{channel}.wav"


def transcript_file(corpus: Path, part: str, session: str) -> Path:
    return Path(corpus) / "transcriptions" / part / f"{session}.json"


def hms(seconds: float) -> str:
    """Seconds to CHiME-6's "H:MM:SS.ss"."""
    centis = int(round(seconds * 100))
    h, rem = divmod(centis, 360000)
    m, rem = divmod(rem, 6000)
    return f"{h}:{m:02d}:{rem // 100:02d}.{rem % 100:02d}"


def seconds(hms_text: str) -> float:
    h, m, s = hms_text.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


@dataclass
class CheckReport:
    """What a layout check found: fatal problems, and segments that stage 1 will skip."""

    problems: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    speakers: dict[str, list[str]] = field(default_factory=dict)  # session -> worn-mic speakers
    arrays: dict[str, list[str]] = field(default_factory=dict)  # session -> complete arrays
    segments: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def message(self, corpus: Path) -> str:
        head = f"CHiME-6 corpus at {corpus} is not usable ({len(self.problems)} problem(s)):"
        shown = self.problems[:40]
        more = [f"  ... and {len(self.problems) - 40} more"] if len(self.problems) > 40 else []
        return "\n".join([head] + [f"  - {p}" for p in shown] + more)


def _wav_data_shortfall(path: Path) -> int:
    """Bytes that a RIFF/WAVE file's ``data`` chunk announces but the file does not hold (0 if whole).

    libsndfile quietly shortens a truncated file's frame count to what is there, so the header is read
    here: chunks are walked from the 12-byte RIFF header to the ``data`` chunk (RF64 and odd files: 0).
    """
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return 0
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            cid, clen = struct.unpack("<4sI", f.read(8))
            if cid == b"data":
                return max(0, pos + 8 + clen - size)
            pos += 8 + clen + (clen & 1)
    return 0


def check_wav(path: Path, channels: int | None = None) -> str | None:
    """None if ``path`` is a readable 16 kHz wav whose data is complete, else what is wrong."""
    try:
        info = sf.info(str(path))
    except Exception as e:  # soundfile raises its own error types for corrupt headers
        return f"{path}: not a readable audio file ({e})"
    if info.samplerate != SAMPLE_RATE:
        return f"{path}: sample rate {info.samplerate}, expected {SAMPLE_RATE}"
    if channels is not None and info.channels != channels:
        return f"{path}: {info.channels} channel(s), expected {channels}"
    if info.frames <= 0:
        return f"{path}: holds no audio samples"
    missing = _wav_data_shortfall(path)
    if missing:
        return f"{path}: truncated: its header announces {missing} more bytes of samples than the file holds"
    return None


def check_transcript(path: Path, session: str, part: str, report: CheckReport) -> list[dict]:
    """Parse and validate one transcript file; fatal problems and skips go into ``report``."""
    try:
        segments = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        report.problems.append(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}")
        return []
    except UnicodeDecodeError as e:
        report.problems.append(f"{path}: not UTF-8 text ({e})")
        return []
    if not isinstance(segments, list):
        report.problems.append(f"{path}: expected a JSON list of segments, got {type(segments).__name__}")
        return []
    required = ["start_time", "end_time", "words", "speaker", "session_id"]
    if part != "train":
        required += ["ref", "location"]
    good = []
    for i, seg in enumerate(segments):
        where = f"{path}: segment {i}"
        if not isinstance(seg, dict):
            report.problems.append(f"{where}: expected an object, got {type(seg).__name__}")
            continue
        missing = [k for k in required if k not in seg]
        if missing:
            report.problems.append(f"{where}: missing field(s) {', '.join(missing)}")
            continue
        if not all(isinstance(seg[k], str) for k in required):
            report.problems.append(f"{where}: fields {', '.join(required)} must be strings")
            continue
        if seg["session_id"] != session:
            report.problems.append(f"{where}: session_id {seg['session_id']!r} in the file of {session}")
            continue
        if not _SPEAKER.match(seg["speaker"]):
            report.problems.append(f"{where}: speaker {seg['speaker']!r} is not a P-style id (P05)")
            continue
        if not (_TIME.match(seg["start_time"]) and _TIME.match(seg["end_time"])):
            report.problems.append(f"{where}: times must look like H:MM:SS.ss, got "
                                   f"{seg['start_time']!r} - {seg['end_time']!r}")
            continue
        if seconds(seg["start_time"]) >= seconds(seg["end_time"]):
            report.skip("start_time >= end_time")  # lhotse and Kaldi skip these
            continue
        if not seg["words"].strip():
            report.skip("empty words")
            continue
        good.append(seg)
    report.segments += len(good)
    return good


def check_corpus(corpus: str | Path, parts: tuple[str, ...] = PARTS, need_arrays: tuple[str, ...] = (),
                 check_audio: bool = True) -> CheckReport:
    """Check a CHiME-6 copy: every session's transcript, worn microphones and (for the parts in
    ``need_arrays``) array channels. Audio files are opened and checked when ``check_audio``."""
    corpus = Path(corpus)
    report = CheckReport()
    if not corpus.is_dir():
        report.problems.append(f"{corpus}: no such directory")
        return report
    for sub in ("audio", "transcriptions"):
        if not (corpus / sub).is_dir():
            report.problems.append(f"{corpus / sub}: missing directory")
    if report.problems:
        return report
    for part in parts:
        for session in SESSIONS[part]:
            tpath = transcript_file(corpus, part, session)
            if not tpath.is_file():
                report.problems.append(f"{tpath}: missing transcript of session {session} ({part})")
                segments = []
            else:
                segments = check_transcript(tpath, session, part, report)
            audio_dir = corpus / "audio" / part
            worn = sorted(p.stem.split("_", 1)[1] for p in audio_dir.glob(f"{session}_P*.wav"))
            report.speakers[session] = worn
            if not worn:
                report.problems.append(f"{audio_dir}: no worn-microphone audio {session}_P*.wav for session {session}")
            for spk in sorted({s["speaker"] for s in segments} - set(worn)):
                report.problems.append(f"{tpath}: speaker {spk} has segments but no worn microphone "
                                       f"{worn_file(corpus, part, session, spk).name}")
            if check_audio:
                for spk in worn:
                    err = check_wav(worn_file(corpus, part, session, spk), channels=2)
                    if err:
                        report.problems.append(err)
            complete = []
            for array in ARRAYS:
                files = [array_file(corpus, part, session, array, c) for c in range(1, CHANNELS_PER_ARRAY + 1)]
                present = [f for f in files if f.exists()]
                if len(present) == CHANNELS_PER_ARRAY:
                    complete.append(array)
                elif present:
                    missing = [f.name for f in files if not f.exists()]
                    report.problems.append(f"{audio_dir}: array {array} of {session} lacks {', '.join(missing)}")
                if check_audio:
                    for f in present:
                        err = check_wav(f, channels=1)
                        if err:
                            report.problems.append(err)
            report.arrays[session] = complete
            if part in need_arrays:
                if not complete:
                    report.problems.append(f"{audio_dir}: no array audio {session}_U0*.CH*.wav for session "
                                           f"{session}, needed for array (mdm) manifests of {part}")
                for seg in segments:
                    if part != "train" and seg.get("ref") not in complete and complete:
                        report.problems.append(f"{tpath}: reference array {seg.get('ref')!r} of a segment "
                                               f"has no audio (arrays present: {', '.join(complete)})")
                        break
    return report
