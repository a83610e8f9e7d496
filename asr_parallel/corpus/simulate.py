"""A simulated CHiME-6 corpus: synthetic dinner-party conversations in CHiME-6's exact layout.

CHiME-6 is licensed and cannot be downloaded here, so the recipe generates a stand-in that the same
preparation code reads as it reads the real corpus (see :mod:`asr_parallel.corpus.chime6`):

* all 20 sessions in the official split, 4 participants each, with P-style speaker ids; the
  participants of dev and eval never occur in train;
* every participant is a distinct synthetic voice (espeak-ng, flite or festival; base voice, variant,
  speaking rate and pitch). Dev and eval voices are configurations never used in training, built on
  the training speakers' base voices, as new speakers of a corpus share its training speakers' accents;
* utterances are real English sentences (Debian's fortune files, :mod:`asr_parallel.corpus.text`),
  train and test sentences disjoint over a shared vocabulary;
* each session is a conversation: turn-taking with pauses, overlapping turns and backchannels, in
  three locations (kitchen, dining, living) with the speakers in new places in each;
* one room per session simulated with pyroomacoustics' image-source method (Allen and Berkley 1979)
  at a home-like reverberation time, worn binaural microphones at each participant's ears and 4-channel
  linear arrays of Kinect-like geometry against the walls, plus diffuse background noise;
* transcripts in CHiME-6's JSON format, with [noise], [laughs] and [inaudible ...] tags and
  [redacted] segments (whose audio is muted) as the real corpus has.

Everything is deterministic from the seed; sessions are generated independently, written atomically
and marked done, so an interrupted run resumes with the sessions it had not finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from asr_parallel.config import SimulationConfig
from asr_parallel.corpus import chime6
from asr_parallel.corpus.text import sentence_pools, words_of
from asr_parallel.corpus.voices import Voice, base_voices, synthesize
from asr_parallel.utils.io import StageMarker, atomic_path, atomic_write_json

log = logging.getLogger(__name__)

SR = chime6.SAMPLE_RATE
# Kinect v1 microphone x-offsets from the device centre (m): an irregular 4-element linear array.
KINECT_OFFSETS = np.array([-0.113, 0.036, 0.076, 0.113])
BACKCHANNELS = ["Yeah.", "Mhm.", "Okay.", "Right.", "Mm.", "Oh really?", "Yes.", "I see."]
EAR_OFFSET = 0.08  # m, half the distance between the ears
MOUTH_TO_EAR = 0.1  # m


@dataclass(frozen=True)
class Speaker:
    id: str
    session: str
    voice: Voice


@dataclass
class Utterance:
    speaker: str
    words: str  # transcript text as written in the JSON
    spoken: str  # text given to the synthesizer ("" for none)
    kind: str = "speech"  # speech | backchannel
    tag: str = ""  # "", noise, laughs, inaudible, redacted
    start: float = 0.0  # s, set when laid on the timeline
    duration: float = 0.0
    audio: np.ndarray | None = None  # synthesized speech at SR
    phase: int = 0  # index into chime6.LOCATIONS


# ------------------------------------------------------------------------------------------
# Speakers and voices
# ------------------------------------------------------------------------------------------


def session_speakers() -> dict[str, list[str]]:
    """P-style ids, four per session in session order (S01: P01-P04, S02: P05-P08, ...)."""
    all_sessions = sorted(s for part in chime6.SESSIONS.values() for s in part)
    return {s: [f"P{4 * i + k + 1:02d}" for k in range(4)] for i, s in enumerate(all_sessions)}


def _random_voice(rng: random.Random, base: tuple[str, str, str, str]) -> Voice:
    engine, name, variant, gender = base
    return Voice(engine=engine, base=name, variant=variant, gender=gender,
                 rate=round(rng.uniform(0.85, 1.2), 2), pitch=round(rng.uniform(0.85, 1.2), 2))


def assign_voices(cfg: SimulationConfig) -> dict[str, Voice]:
    """A distinct voice per speaker; dev/eval voices are unseen configurations of training base voices.

    Training covers every engine with both a male and a female voice (a model never trained on any
    female voice of an engine fails on one), then draws the rest with espeak-ng, the engine with most
    variety, given half of the weight.
    """
    rng = random.Random(cfg.seed)
    pool = base_voices(cfg.engines)
    if cfg.base_voice_limit:
        # Keep one male and one female base voice per engine, then fill up to the limit at random.
        keep = {next(b for b in pool if b[0] == e and b[3] == g) for e in cfg.engines for g in ("male", "female")
                if any(b[0] == e and b[3] == g for b in pool)}
        rest = [b for b in pool if b not in keep]
        pool = sorted(keep | set(rng.sample(rest, max(0, min(len(rest), cfg.base_voice_limit - len(keep))))))
    by_engine = {e: [b for b in pool if b[0] == e] for e in cfg.engines}
    speakers = session_speakers()
    train_ids = [p for s in chime6.SESSIONS["train"] for p in speakers[s]]
    test_ids = [p for part in ("dev", "eval") for s in chime6.SESSIONS[part] for p in speakers[s]]

    train_bases: list[tuple[str, str, str, str]] = []
    for engine in cfg.engines:
        for gender in ("male", "female"):
            options = [b for b in by_engine[engine] if b[3] == gender]
            if not options:
                raise RuntimeError(f"engine {engine} has no {gender} voice; cannot cover both genders in training")
            train_bases.append(rng.choice(options))
    weights = [0.5 if b[0] == "espeak-ng" else 0.5 / max(1, len(cfg.engines) - 1) for b in pool]
    weights = [w / sum(1 for c in pool if c[0] == b[0]) for w, b in zip(weights, pool)]
    while len(train_bases) < len(train_ids):
        train_bases.append(rng.choices(pool, weights=weights)[0])
    rng.shuffle(train_bases)

    voices: dict[str, Voice] = {}
    used: set[str] = set()
    for pid, base in zip(train_ids, train_bases):
        v = _random_voice(rng, base)
        while v.key() in used:
            v = _random_voice(rng, base)
        voices[pid] = v
        used.add(v.key())
    distinct_train_bases = sorted(set(train_bases))
    for pid in test_ids:
        v = _random_voice(rng, rng.choice(distinct_train_bases))
        while v.key() in used:
            v = _random_voice(rng, rng.choice(distinct_train_bases))
        voices[pid] = v
        used.add(v.key())
    return voices


# ------------------------------------------------------------------------------------------
# Conversation
# ------------------------------------------------------------------------------------------


def plan_utterances(rng: random.Random, cfg: SimulationConfig, speakers: list[str], sentences: list[str],
                    minutes: float) -> list[Utterance]:
    """Texts and speakers of a conversation long enough to fill ``minutes`` (timing comes later).

    ``sentences`` is this session's share of the text pool; it is gone through in a shuffled order
    (and again if the session is long), so that the sessions of a part together cover their pool.
    """
    target = minutes * 60 * 1.15  # a margin: actual durations are known only after synthesis
    order = list(sentences)
    rng.shuffle(order)
    est, out, last, next_sentence = 0.0, [], None, 0

    def take() -> str:
        nonlocal next_sentence
        s = order[next_sentence % len(order)]
        next_sentence += 1
        return s

    while est < target:
        spk = rng.choice([s for s in speakers if s != last] if last and rng.random() < 0.9 else speakers)
        n = 1 if rng.random() < 0.7 else 2
        text = " ".join(take() for _ in range(n))
        utt = Utterance(speaker=spk, words=text, spoken=text)
        r = rng.random()
        if r < cfg.redacted_probability:
            utt.tag, utt.words, utt.spoken = "redacted", "[redacted]", text
        elif r < cfg.redacted_probability + cfg.tag_probability:
            utt.tag = rng.choice(["noise", "laughs", "inaudible"])
            if utt.tag == "noise":
                utt.words = "[noise] " + text
            elif utt.tag == "laughs":
                utt.words, utt.spoken = "[laughs] " + text, "Ha ha ha. " + text
        out.append(utt)
        est += 0.33 * len(words_of(text)) + cfg.mean_pause_seconds
        if rng.random() < cfg.backchannel_probability:
            other = rng.choice([s for s in speakers if s != spk])
            bc = rng.choice(BACKCHANNELS)
            out.append(Utterance(speaker=other, words=bc, spoken=bc, kind="backchannel"))
        last = spk
    return out


def lay_out(rng: random.Random, cfg: SimulationConfig, utts: list[Utterance], minutes: float) -> list[Utterance]:
    """Place synthesized utterances on a timeline with pauses and overlaps; drop those past the end.

    A turn starts after the previous one with an exponential pause, or, with
    ``overlap_probability``, up to ``max_overlap_seconds`` before it ends. A backchannel falls inside
    the turn it answers. No speaker overlaps themselves.
    """
    limit = minutes * 60
    t, prev, placed = 1.0, None, []
    speaker_free: dict[str, float] = {}
    for u in utts:
        if u.kind == "backchannel" and prev is not None:
            start = prev.start + rng.uniform(0.3, 0.8) * prev.duration
        elif prev is not None and rng.random() < cfg.overlap_probability:
            start = max(prev.start + 0.3, t - rng.uniform(0.2, cfg.max_overlap_seconds))
        else:
            start = t + rng.expovariate(1.0 / cfg.mean_pause_seconds)
        start = max(start, speaker_free.get(u.speaker, 0.0) + 0.2)
        if start + u.duration > limit:
            break
        u.start = start
        speaker_free[u.speaker] = start + u.duration
        placed.append(u)
        if u.kind != "backchannel":
            t = max(t, start + u.duration)
            prev = u
    return placed


def overlap_fraction(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """(seconds with >= 2 active speakers, seconds with >= 1), from (start, end) intervals."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    active, last, speech, overlap = 0, 0.0, 0.0, 0.0
    for time, delta in events:
        if active >= 1:
            speech += time - last
        if active >= 2:
            overlap += time - last
        active += delta
        last = time
    return overlap, speech


# ------------------------------------------------------------------------------------------
# Acoustics
# ------------------------------------------------------------------------------------------


@dataclass
class Room:
    dims: np.ndarray
    rt60: float
    snr_db: float
    arrays: dict[str, np.ndarray]  # array id -> (3, 4) microphone positions


def make_room(rng: np.random.Generator, cfg: SimulationConfig, session: str, render_arrays: bool) -> Room:
    dims = np.array([rng.uniform(5.5, 8.0), rng.uniform(4.0, 6.0), rng.uniform(2.4, 3.0)])
    rt60 = float(rng.uniform(*cfg.rt60_range))
    snr = float(rng.uniform(*cfg.snr_db_range))
    arrays = {}
    if render_arrays:
        wanted = [a for a in chime6.ARRAYS[: cfg.num_arrays] if a not in chime6.MISSING_ARRAYS.get(session, set())]
        for i, a in enumerate(chime6.ARRAYS):
            # Six nominal places along the walls; each array faces into the room.
            along = (i // 2 + 0.5) / 3
            wall_y = 0.15 if i % 2 == 0 else dims[1] - 0.15
            centre = np.array([along * dims[0], wall_y, rng.uniform(0.8, 1.6)])
            if a in wanted:
                arrays[a] = np.stack([centre + [o, 0.0, 0.0] for o in KINECT_OFFSETS], axis=1)
    return Room(dims=dims, rt60=rt60, snr_db=snr, arrays=arrays)


def place_speakers(rng: np.random.Generator, room: Room, n: int) -> list[np.ndarray]:
    """Mouth positions of ``n`` seated or standing people at least 0.9 m apart, away from walls."""
    out: list[np.ndarray] = []
    for _ in range(1000):
        if len(out) == n:
            break
        p = np.array([rng.uniform(0.8, room.dims[0] - 0.8), rng.uniform(0.8, room.dims[1] - 0.8),
                      rng.uniform(1.1, 1.7)])
        if all(np.linalg.norm(p - q) > 0.9 for q in out):
            out.append(p)
    if len(out) < n:
        raise RuntimeError("could not place speakers in the room")
    return out


def room_impulse_responses(room: Room, sources: list[np.ndarray], mics: np.ndarray) -> list[list[np.ndarray]]:
    """RIRs [mic][source] by the image-source method at the room's RT60 (Sabine's formula)."""
    import pyroomacoustics as pra

    absorption, max_order = pra.inverse_sabine(room.rt60, room.dims)
    shoebox = pra.ShoeBox(room.dims, fs=SR, materials=pra.Material(absorption),
                          max_order=min(max_order, 40), air_absorption=False)
    for s in sources:
        shoebox.add_source(s)
    shoebox.add_microphone_array(mics)
    shoebox.compute_rir()
    return shoebox.rir


def diffuse_noise(rng: np.random.Generator, n_channels: int, n_samples: int) -> np.ndarray:
    """Home-like background noise: pink (1/f) spectrum, partly coherent across microphones
    (a component shared by all microphones, as appliances' hum is, plus one of each microphone's own).

    Pink noise by filtering white noise with the 3-pole, 3-zero approximation of a -3 dB/octave slope
    given in J. O. Smith, "Spectral Audio Signal Processing" (section "Example: Synthesis of 1/f Noise").
    """
    from scipy.signal import lfilter

    b = [0.049922035, -0.095993537, 0.050612699, -0.004408786]
    a = [1.0, -2.494956002, 2.017265875, -0.522189400]
    white = rng.standard_normal((n_channels + 1, n_samples)).astype(np.float32)
    pink = lfilter(b, a, white, axis=-1).astype(np.float32)
    noise = 0.5 * pink[:1] + pink[1:]
    return noise / (noise.std() + 1e-12)


def noise_burst(rng: np.random.Generator, seconds: float = 0.4) -> np.ndarray:
    """A short clatter (cutlery, a chair): decaying broadband bursts."""
    n = int(seconds * SR)
    env = np.exp(-np.arange(n) / (0.05 * SR))
    burst = rng.standard_normal(n) * env
    return (0.4 * burst / (np.abs(burst).max() + 1e-9)).astype(np.float32)


# ------------------------------------------------------------------------------------------
# One session
# ------------------------------------------------------------------------------------------


def _session_seed(seed: int, session: str) -> int:
    return (seed * 1000003 + int(session[1:])) % (2**31)


def _write_wav(path: Path, audio: np.ndarray) -> None:
    import soundfile as sf

    with atomic_path(path) as tmp:
        sf.write(str(tmp), audio, SR, subtype="PCM_16")


def generate_session(corpus: Path, session: str, cfg: SimulationConfig, voices: dict[str, Voice],
                     sentences: list[str], workdir: Path) -> dict:
    """Synthesize, lay out and render one session; write its audio and transcript. Returns its totals."""
    part = chime6.part_of(session)
    pyrng = random.Random(_session_seed(cfg.seed, session))
    rng = np.random.default_rng(_session_seed(cfg.seed, session))
    speakers = session_speakers()[session]
    minutes = cfg.train_minutes_per_session if part == "train" else cfg.eval_minutes_per_session

    # 1. Text, then speech for each speaker in one batch (one synthesizer process for festival).
    utts = plan_utterances(pyrng, cfg, speakers, sentences, minutes)
    for spk in speakers:
        mine = [u for u in utts if u.speaker == spk]
        audio = synthesize(voices[spk], [u.spoken for u in mine], sample_rate=SR, workdir=str(workdir))
        for u, a in zip(mine, audio):
            u.audio = a
            u.duration = len(a) / SR
    utts = lay_out(pyrng, cfg, utts, minutes)
    n_samples = int((max(u.start + u.duration for u in utts) + 1.5) * SR)

    # 2. Dry tracks per speaker and location phase; tags change the audio as they say.
    n_phases = len(chime6.LOCATIONS)
    phase_len = n_samples / n_phases
    dry = np.zeros((n_phases, len(speakers), n_samples), dtype=np.float32)
    for u in utts:
        a = u.audio.astype(np.float32) * (10 ** (rng.uniform(-3, 3) / 20))
        if u.tag == "redacted":
            a = np.zeros_like(a)  # the real corpus mutes redacted speech
        elif u.tag == "inaudible":
            # The last words trail off: strongly attenuated, so the transcriber could not make them out.
            cut = int(len(a) * 0.6)
            a[cut:] *= 0.03
            kept = words_of(u.words)
            k = max(1, int(round(len(kept) * 0.6)))
            u.words = " ".join(u.words.split()[:k]) + f" [inaudible {chime6.hms(u.start + 0.6 * u.duration)}]"
        s = int(u.start * SR)
        phase = min(int(s / phase_len), n_phases - 1)
        dry[phase, speakers.index(u.speaker), s:s + len(a)] += a
        if u.tag == "noise":
            b = noise_burst(rng)
            b0 = max(0, s - len(b))
            dry[phase, speakers.index(u.speaker), b0:b0 + len(b)] += b[: s - b0]
        u.phase = phase

    # 3. Room, microphones and rendering.
    render_arrays = part != "train" or cfg.train_arrays
    room = make_room(rng, cfg, session, render_arrays)
    array_ids = list(room.arrays)
    n_mics = 2 * len(speakers) + 4 * len(array_ids)
    out = np.zeros((n_mics, n_samples), dtype=np.float32)
    ref_arrays = []
    from scipy.signal import oaconvolve

    for phase in range(n_phases):
        mouths = place_speakers(rng, room, len(speakers))
        mics = []
        for m in mouths:
            facing = rng.uniform(0, 2 * np.pi)
            ear_axis = np.array([np.cos(facing), np.sin(facing), 0.0])
            head = m + np.array([-np.sin(facing), np.cos(facing), 0.0]) * MOUTH_TO_EAR * 0.5 + [0, 0, 0.08]
            mics += [head - EAR_OFFSET * ear_axis, head + EAR_OFFSET * ear_axis]
        mic_matrix = np.concatenate([np.stack(mics, axis=1)] + [room.arrays[a] for a in array_ids], axis=1)
        rirs = room_impulse_responses(room, mouths, mic_matrix)
        ref_arrays.append([
            min(array_ids, key=lambda a: np.linalg.norm(room.arrays[a].mean(axis=1) - m)) if array_ids else "U01"
            for m in mouths
        ])
        for k in range(len(speakers)):
            track = dry[phase, k]
            nz = np.flatnonzero(track)
            if len(nz) == 0:
                continue
            a0, a1 = nz[0], nz[-1] + 1
            chunk = track[a0:a1]
            for mic in range(n_mics):
                rir = rirs[mic][k]
                worn_owner = mic // 2 if mic < 2 * len(speakers) else None
                gain = 1.0 if worn_owner in (None, k) else 10 ** (-cfg.worn_crosstalk_db / 20)
                y = oaconvolve(chunk, rir.astype(np.float32))[: n_samples - a0]
                out[mic, a0:a0 + len(y)] += gain * y

    # 4. Diffuse noise at the chosen SNR relative to speech at the array (or, without arrays, at a
    # distance of 2 m, i.e. the worn microphones' level minus 26 dB).
    speech_active = np.abs(dry.sum(axis=(0, 1))) > 1e-4
    if array_ids:
        ref_level = out[2 * len(speakers):, speech_active].std()
    else:
        ref_level = out[: 2 * len(speakers), speech_active].std() * 10 ** (-26 / 20)
    noise = diffuse_noise(rng, n_mics, n_samples) * ref_level * 10 ** (-room.snr_db / 20)
    out += noise

    # 5. Files: each device peak-normalised like a recorder's gain; transcript last, then the marker.
    files = []
    for i, spk in enumerate(speakers):
        worn = out[2 * i: 2 * i + 2]
        worn = 0.7 * worn / (np.abs(worn).max() + 1e-9)
        path = chime6.worn_file(corpus, part, session, spk)
        _write_wav(path, worn.T)
        files.append(path)
    for j, a in enumerate(array_ids):
        arr = out[2 * len(speakers) + 4 * j: 2 * len(speakers) + 4 * j + 4]
        arr = 0.5 * arr / (np.abs(arr).max() + 1e-9)
        for c in range(4):
            path = chime6.array_file(corpus, part, session, a, c + 1)
            _write_wav(path, arr[c])
            files.append(path)

    segments = []
    for u in sorted(utts, key=lambda u: u.start):
        margin0, margin1 = pyrng.uniform(0.05, 0.2), pyrng.uniform(0.05, 0.2)
        seg = {
            "end_time": chime6.hms(min(u.start + u.duration + margin1, n_samples / SR)),
            "start_time": chime6.hms(max(0.0, u.start - margin0)),
            "words": u.words,
            "speaker": u.speaker,
            "session_id": session,
        }
        if part != "train":
            seg["ref"] = ref_arrays[u.phase][speakers.index(u.speaker)]
            seg["location"] = chime6.LOCATIONS[u.phase]
        segments.append(seg)
    atomic_write_json(chime6.transcript_file(corpus, part, session), segments, indent=4)

    overlap, speech = overlap_fraction([(u.start, u.start + u.duration) for u in utts if u.tag != "redacted"])
    return {
        "session": session,
        "part": part,
        "seconds": n_samples / SR,
        "speech_seconds": speech,
        "overlap_seconds": overlap,
        "utterances": len(utts),
        "speakers": speakers,
        "arrays": array_ids,
        "rt60": room.rt60,
        "snr_db": room.snr_db,
        "bytes": sum(p.stat().st_size for p in files),
    }


def _session_job(args) -> dict:
    corpus, session, cfg, voices, sentences, workdir = args
    import torch

    torch.set_num_threads(1)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    return generate_session(Path(corpus), session, cfg, voices, sentences, Path(workdir))


def simulate_corpus(corpus: str | Path, state_dir: str | Path, cfg: SimulationConfig, num_jobs: int = 1) -> dict:
    """Generate (or finish generating) the whole corpus; returns and writes its totals."""
    corpus, state_dir = Path(corpus), Path(state_dir)
    fp = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:16]
    voices = assign_voices(cfg)
    pools = sentence_pools(cfg.train_sentences, cfg.eval_sentences, cfg.vocabulary_size,
                           cfg.min_words, cfg.max_words, cfg.seed, cfg.eval_oov_sentence_fraction)
    atomic_write_json(state_dir / "voices.json", {p: asdict(v) | {"key": v.key()} for p, v in sorted(voices.items())})
    atomic_write_json(state_dir / "sentences.json", {"train": pools.train, "eval": pools.eval})

    todo, stats = [], {}
    test_sessions = chime6.SESSIONS["dev"] + chime6.SESSIONS["eval"]
    for part, sessions in chime6.SESSIONS.items():
        for session in sessions:
            marker = StageMarker(state_dir, f"sim_{session}", fp)
            if marker.is_done():
                stats[session] = json.loads(marker.path.read_text())["stats"]
            else:
                # Each session speaks its own share of the pool: training sessions together cover the
                # training text, and dev and eval hold different sentences.
                if part == "train":
                    i = chime6.SESSIONS["train"].index(session)
                    sentences = pools.train[i::len(chime6.SESSIONS["train"])]
                else:
                    sentences = pools.eval[test_sessions.index(session)::len(test_sessions)]
                todo.append((str(corpus), session, cfg, voices, sentences, str(state_dir / "tmp" / session)))
    if todo:
        log.info("simulating %d of 20 sessions with %d job(s)", len(todo), num_jobs)
    from tqdm import tqdm

    with ProcessPoolExecutor(max_workers=num_jobs) as pool:
        for result in tqdm(pool.map(_session_job, todo), total=len(todo), desc="sessions", disable=not todo):
            StageMarker(state_dir, f"sim_{result['session']}", fp).mark_done(stats=result)
            stats[result["session"]] = result
    shutil.rmtree(state_dir / "tmp", ignore_errors=True)
    summary = summarize(stats, voices)
    atomic_write_json(state_dir / "corpus_summary.json", summary)
    return summary


def summarize(stats: dict[str, dict], voices: dict[str, Voice]) -> dict:
    per_part = {}
    for part, sessions in chime6.SESSIONS.items():
        rows = [stats[s] for s in sessions]
        speech = sum(r["speech_seconds"] for r in rows)
        per_part[part] = {
            "sessions": len(rows),
            "hours": round(sum(r["seconds"] for r in rows) / 3600, 3),
            "speech_hours": round(speech / 3600, 3),
            "utterances": sum(r["utterances"] for r in rows),
            "speakers": sum(len(r["speakers"]) for r in rows),
            "overlap_fraction": round(sum(r["overlap_seconds"] for r in rows) / max(speech, 1e-9), 4),
            "arrays_per_session": max(len(r["arrays"]) for r in rows),
            "disk_mb": round(sum(r["bytes"] for r in rows) / 2**20, 1),
        }
    engines = {}
    for v in voices.values():
        engines.setdefault(v.engine, {"male": 0, "female": 0})[v.gender] += 1
    return {"parts": per_part, "voices_per_engine": engines,
            "total_disk_mb": round(sum(p["disk_mb"] for p in per_part.values()), 1)}


def format_summary(summary: dict) -> str:
    lines = [f"{'part':6} {'sess':>4} {'hours':>6} {'speech h':>8} {'utts':>6} {'spk':>4} {'overlap':>7} {'arrays':>6} {'MB':>8}"]
    for part, p in summary["parts"].items():
        lines.append(f"{part:6} {p['sessions']:4d} {p['hours']:6.2f} {p['speech_hours']:8.2f} {p['utterances']:6d} "
                     f"{p['speakers']:4d} {p['overlap_fraction']:7.1%} {p['arrays_per_session']:6d} {p['disk_mb']:8.1f}")
    lines.append(f"disk used: {summary['total_disk_mb']:.1f} MB; voices per engine: "
                 + ", ".join(f"{e} {c['male']}m/{c['female']}f" for e, c in summary["voices_per_engine"].items()))
    return "\n".join(lines)
