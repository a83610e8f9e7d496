"""Text-to-speech voices for the simulated corpus: espeak-ng, flite and festival.

A :class:`Voice` is an engine voice plus a speaking-rate and a pitch factor
(1.0 = the engine's default).  :func:`synthesize` turns texts into float32 mono
arrays at a fixed sample rate, trimmed and peak-normalised, deterministically.

How rate and pitch are realised (all were checked by measuring duration and f0):

* espeak-ng: ``-s`` words per minute (175 x rate) and ``-p`` (0-99), mapped
  from the pitch factor through a measured table of f0 ratio against ``-p``.
* flite: ``duration_stretch`` (the voice's default / rate) and the multiplicative
  ``f0_shift``; ``rms`` ignores every f0 feature, so it is shifted by resampling.
* festival: ``Duration_Stretch`` (the voice's default / rate) and the diphone
  voices' ``int_lr_params`` target mean and deviation; the HTS voice ignores both,
  so it uses hts_engine's ``-r`` speed and is shifted by resampling.

The resampling shift plays the waveform ``pitch`` times faster, which raises f0
(and formants) by that factor and shortens it by the same factor; the engine is
asked for a correspondingly slower rate, so the final duration still follows
``rate`` alone.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

ENGINES = ("espeak-ng", "flite", "festival")

ESPEAK_BASES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan",
                "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
# Variants (file names under espeak-ng-data/voices/!v) with the gender that
# `espeak-ng --voices=variant` gives; whispering, robotic and child-like ones are left out.
ESPEAK_VARIANTS = {
    **{v: "male" for v in ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "klatt2", "klatt4")},
    **{v: "female" for v in ("f1", "f2", "f3", "f4", "f5", "Annie", "belinda", "linda", "steph")},
}
FLITE_VOICES = {"kal16": "male", "awb": "male", "rms": "male", "kal": "male", "slt": "female"}
FESTIVAL_VOICES = {"kal_diphone": "male", "ked_diphone": "male", "cmu_us_slt_arctic_hts": "female"}
_ENGINE_VOICES = {"espeak-ng": ESPEAK_BASES, "flite": FLITE_VOICES, "festival": FESTIVAL_VOICES}

_ESPEAK_DEFAULT_WPM = 175
# Median f0 relative to -p 50 against -p, measured on en-us, en-us+f3 and en-gb-x-rp+m5.
_ESPEAK_P = np.array([0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95])
_ESPEAK_F0_RATIO = np.array([0.691, 0.736, 0.783, 0.843, 0.909, 1.0,
                             1.091, 1.202, 1.333, 1.487, 1.561])
# Voices whose default duration_stretch is not 1.0.
_FLITE_STRETCH = {"kal": 1.1, "kal16": 1.1}
# Voices without a working pitch control; they are shifted by resampling.
_RESAMPLE_PITCH = {("flite", "rms"), ("festival", "cmu_us_slt_arctic_hts")}

_TRIM_MARGIN_S = 0.05
_TRIM_FLOOR_DB = -40.0
_PEAK = 0.5


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker: an engine voice with rate and pitch factors."""

    engine: str
    base: str
    variant: str
    gender: str
    rate: float = 1.0
    pitch: float = 1.0

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown TTS engine {self.engine!r}")
        if self.gender not in ("male", "female"):
            raise ValueError(f"gender must be 'male' or 'female', not {self.gender!r}")
        if not (self.rate > 0 and self.pitch > 0):
            raise ValueError(f"rate and pitch must be positive: {self.rate}, {self.pitch}")

    def key(self) -> str:
        """A stable short id, e.g. ``espeak-ng:en-gb+f3:r1.05:p0.95``."""
        name = f"{self.base}+{self.variant}" if self.variant else self.base
        return f"{self.engine}:{name}:r{self.rate:.4g}:p{self.pitch:.4g}"


def base_voices(engines: list[str]) -> list[tuple[str, str, str, str]]:
    """All usable ``(engine, base, variant, gender)`` combinations of ``engines``."""
    out: list[tuple[str, str, str, str]] = []
    for engine in engines:
        if engine == "espeak-ng":
            out += [(engine, b, v, g) for b in ESPEAK_BASES for v, g in ESPEAK_VARIANTS.items()]
        elif engine == "flite":
            out += [(engine, b, "", g) for b, g in FLITE_VOICES.items()]
        elif engine == "festival":
            out += [(engine, b, "", g) for b, g in FESTIVAL_VOICES.items()]
        else:
            raise ValueError(f"unknown TTS engine {engine!r}")
    return out


def check_engines(engines: list[str]) -> list[str]:
    """Human-readable problems (missing binaries or voices) for ``engines``; empty if fine."""
    problems: list[str] = []
    for engine in engines:
        if engine not in _ENGINE_VOICES:
            problems.append(f"unknown TTS engine {engine!r}")
            continue
        if shutil.which(engine) is None:
            problems.append(f"{engine}: binary not found on PATH")
            continue
        cmd, stdin = {"espeak-ng": (["espeak-ng", "--voices=en"], None),
                      "flite": (["flite", "-lv"], None),
                      "festival": (["festival", "--pipe"], '(format t "%l\\n" (voice.list))\n'),
                      }[engine]
        try:
            res = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            problems.append(f"{engine}: cannot list voices: {exc}")
            continue
        if engine == "espeak-ng":  # second column of the table is the language/voice name
            listed = {line.split()[1] for line in res.stdout.splitlines()[1:] if line.split()}
        else:
            listed = set(res.stdout.replace("(", " ").replace(")", " ").split())
        problems += [f"{engine}: voice {v!r} is not installed {res.stderr.strip()}".rstrip()
                     for v in _ENGINE_VOICES[engine] if v not in listed]
    return problems


def synthesize(voice: Voice, texts: list[str], sample_rate: int = 16000,
               workdir: str | None = None) -> list[np.ndarray]:
    """Synthesize each text with ``voice``: float32 mono arrays at ``sample_rate``.

    Leading and trailing silence is trimmed to at most 50 ms and each array is
    peak-normalised to 0.5.  Temporary files go to a fresh directory inside
    ``workdir`` (default: the system temp dir) that is removed afterwards.
    Raises RuntimeError naming the engine, voice and stderr when an engine fails.
    """
    if voice.base not in _ENGINE_VOICES[voice.engine]:
        raise ValueError(f"{voice.engine} has no voice {voice.base!r}")
    if voice.variant and (voice.engine != "espeak-ng" or voice.variant not in ESPEAK_VARIANTS):
        raise ValueError(f"unsupported variant {voice.variant!r} for {voice.engine}")
    texts = [" ".join(t.split()) for t in texts]
    if not texts:
        return []
    if not all(texts):
        raise ValueError("cannot synthesize an empty text")
    shift = voice.pitch if (voice.engine, voice.base) in _RESAMPLE_PITCH else 1.0
    with tempfile.TemporaryDirectory(prefix="tts_", dir=workdir) as tmp:
        paths = [os.path.join(tmp, f"out_{i}.wav") for i in range(len(texts))]
        if voice.engine == "festival":
            script = _festival_script(voice, texts, paths, shift, tmp)
            stderr = _run(voice, ["festival", "-b", script], timeout=60 + 10 * len(texts))
        else:
            stderr = "".join(_run(voice, _command(voice, text, path), timeout=60)
                             for text, path in zip(texts, paths))
        out = []
        for path in paths:
            if not os.path.exists(path):
                raise RuntimeError(f"{voice.engine} produced no audio for voice {voice.key()}: "
                                   f"{stderr.strip()}")
            out.append(_postprocess(path, sample_rate, shift))
    return out


def _run(voice: Voice, cmd: list[str], timeout: float) -> str:
    """Run an engine command and return its stderr; any failure raises RuntimeError."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{voice.engine} failed for voice {voice.key()}: {exc}") from exc
    if res.returncode != 0:
        raise RuntimeError(f"{voice.engine} failed for voice {voice.key()} "
                           f"(exit {res.returncode}): {res.stderr.strip()}")
    return res.stderr


def _command(voice: Voice, text: str, path: str) -> list[str]:
    """The espeak-ng or flite command that writes ``text`` to ``path``."""
    txt = path[:-4] + ".txt"
    with open(txt, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    if voice.engine == "espeak-ng":
        # espeak-ng 1.51 silently drops the variant of "en-gb"; "en" is the same voice.
        name = "en" if voice.base == "en-gb" else voice.base
        if voice.variant:
            name += "+" + voice.variant
        wpm = round(_ESPEAK_DEFAULT_WPM * voice.rate)
        p = round(float(np.interp(math.log(voice.pitch), np.log(_ESPEAK_F0_RATIO), _ESPEAK_P)))
        return ["espeak-ng", "-v", name, "-s", str(wpm), "-p", str(min(max(p, 0), 99)),
                "-w", path, "-f", txt]
    shift = voice.pitch if (voice.engine, voice.base) in _RESAMPLE_PITCH else 1.0
    stretch = _FLITE_STRETCH.get(voice.base, 1.0) * shift / voice.rate
    return ["flite", "-voice", voice.base, "--setf", f"duration_stretch={stretch:.6f}",
            "--setf", f"f0_shift={voice.pitch / shift:.6f}", "-f", txt, "-o", path]


def _festival_script(voice: Voice, texts: list[str], paths: list[str], shift: float,
                     tmp: str) -> str:
    """Write the scheme script that synthesizes all ``texts`` in one festival run."""
    lines = [f"(voice_{voice.base})"]
    if voice.base == "cmu_us_slt_arctic_hts":
        lines.append(f'(set! hts_engine_params (append hts_engine_params '
                     f'(list (list "-r" {voice.rate / shift:.6f}))))')
    else:
        lines.append(f"(Parameter.set 'Duration_Stretch "
                     f"(/ (Parameter.get 'Duration_Stretch) {voice.rate:.6f}))")
        scaled = " ".join(
            f"(list '{k} (* {voice.pitch:.6f} (car (cdr (assoc '{k} int_lr_params)))))"
            for k in ("target_f0_mean", "target_f0_std"))
        lines.append(f"(set! int_lr_params (list {scaled} (assoc 'model_f0_mean int_lr_params) "
                     f"(assoc 'model_f0_std int_lr_params)))")
    for text, path in zip(texts, paths):
        lines.append(f"(utt.save.wave (utt.synth (Utterance Text {_scheme_string(text)})) "
                     f"{_scheme_string(path)} 'riff)")
    script = os.path.join(tmp, "synth.scm")
    with open(script, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return script


def _scheme_string(s: str) -> str:
    """``s`` as a double-quoted scheme string literal."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _postprocess(path: str, sample_rate: int, shift: float) -> np.ndarray:
    """Read a wav, resample (applying a pitch ``shift``), trim silence, normalise."""
    # soundfile, unlike scipy, accepts the inconsistent header of flite's 8 kHz kal voice.
    x, sr = sf.read(path, dtype="float64")
    if x.ndim > 1:
        x = x.mean(axis=1)
    # Treating the audio as recorded at sr * shift raises its pitch by `shift`; the
    # virtual rate is rounded to 50 Hz to keep the polyphase filter short.
    virtual = max(50, round(sr * shift / 50) * 50)
    g = math.gcd(sample_rate, virtual)
    if sample_rate != virtual:
        x = resample_poly(x, sample_rate // g, virtual // g)
    hop = max(1, sample_rate // 100)
    n = len(x) // hop
    if n:
        rms = np.sqrt(np.mean(x[: n * hop].reshape(n, hop) ** 2, axis=1))
        active = np.flatnonzero(rms > rms.max() * 10 ** (_TRIM_FLOOR_DB / 20))
        if active.size:
            margin = int(_TRIM_MARGIN_S * sample_rate)
            x = x[max(0, active[0] * hop - margin): min(len(x), (active[-1] + 1) * hop + margin)]
    peak = np.abs(x).max() if len(x) else 0.0
    if peak > 0:
        x = x * (_PEAK / peak)
    return x.astype(np.float32)
