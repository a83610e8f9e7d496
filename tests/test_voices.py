"""Tests for the TTS voice wrappers (espeak-ng, flite, festival)."""

import numpy as np
import pytest

from asr_parallel.corpus.voices import Voice, base_voices, check_engines, synthesize

SR = 16000
TEXT = "The quick brown fox jumps over the lazy dog near the river bank."

# One voice per rate/pitch mechanism: espeak-ng -s/-p, flite duration_stretch/f0_shift,
# flite rms and festival HTS (resampling shift), festival diphone (int_lr_params).
MECHANISMS = [
    ("espeak-ng", "en-gb", "f3", "female"),
    ("flite", "awb", "", "male"),
    ("flite", "rms", "", "male"),
    ("festival", "kal_diphone", "", "male"),
    ("festival", "cmu_us_slt_arctic_hts", "", "female"),
]


def test_engines_installed():
    """tools/setup.sh installs every engine; a missing one is a set-up failure, not a skip."""
    assert check_engines(["espeak-ng", "flite", "festival"]) == []


def _params(cases):
    return [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in cases]


def _one(engine, base, variant, gender, rate=1.0, pitch=1.0, text=TEXT):
    return synthesize(Voice(engine, base, variant, gender, rate, pitch), [text], SR)[0]


def _f0(x: np.ndarray, sr: int = SR, fmin: float = 60.0, fmax: float = 450.0) -> float:
    """Median autocorrelation f0 over loud, clearly periodic 40 ms frames."""
    n, hop = int(0.04 * sr), int(0.01 * sr)
    lo, hi = int(sr / fmax), int(sr / fmin)
    f0s = []
    for start in range(0, len(x) - n, hop):
        frame = x[start:start + n] - x[start:start + n].mean()
        if np.sqrt(np.mean(frame ** 2)) < 0.05:
            continue
        ac = np.correlate(frame, frame, "full")[n - 1:]
        ac = ac[lo:hi] / ac[0]
        best = ac.max()
        if best < 0.5:
            continue
        # the first strong peak, so that a period multiple does not win
        peaks = [i for i in range(1, len(ac) - 1)
                 if ac[i] >= ac[i - 1] and ac[i] >= ac[i + 1] and ac[i] >= 0.85 * best]
        f0s.append(sr / (lo + (peaks[0] if peaks else int(np.argmax(ac)))))
    assert f0s, "no voiced frames found"
    return float(np.median(f0s))


@pytest.mark.parametrize("engine,base,variant,gender", _params(
    MECHANISMS + [("flite", "kal", "", "male"), ("festival", "ked_diphone", "", "male")]))
def test_synthesizes_nonsilent_16k_float(engine, base, variant, gender):
    x = _one(engine, base, variant, gender)
    assert x.dtype == np.float32 and x.ndim == 1
    assert 1.5 * SR < len(x) < 8 * SR
    assert abs(float(np.abs(x).max()) - 0.5) < 1e-3
    assert np.sqrt(np.mean(x.astype(np.float64) ** 2)) > 0.02
    # at most ~50 ms of near-silence (10 ms frames 40 dB below the loudest) at either end
    hop = SR // 100
    rms = np.sqrt(np.mean(x[: len(x) // hop * hop].reshape(-1, hop).astype(np.float64) ** 2, 1))
    loud = np.flatnonzero(rms > rms.max() * 10 ** (-40 / 20))
    assert loud[0] <= 6 and len(rms) - 1 - loud[-1] <= 6


@pytest.mark.parametrize("engine,base,variant,gender", _params(MECHANISMS))
def test_higher_rate_is_shorter(engine, base, variant, gender):
    slow = _one(engine, base, variant, gender, rate=0.85)
    fast = _one(engine, base, variant, gender, rate=1.2)
    assert len(fast) < 0.85 * len(slow)


@pytest.mark.parametrize("engine,base,variant,gender", _params(MECHANISMS))
def test_higher_pitch_raises_f0_not_duration(engine, base, variant, gender):
    low = _one(engine, base, variant, gender, pitch=0.85)
    high = _one(engine, base, variant, gender, pitch=1.2)
    assert _f0(high) > 1.2 * _f0(low)
    assert abs(len(high) / len(low) - 1) < 0.1


@pytest.mark.parametrize("engine,base,variant,gender", _params(
    [("espeak-ng", "en-us", "m3", "male"), ("festival", "cmu_us_slt_arctic_hts", "", "female")]))
def test_deterministic(engine, base, variant, gender):
    a = _one(engine, base, variant, gender, rate=1.1, pitch=0.9)
    b = _one(engine, base, variant, gender, rate=1.1, pitch=0.9)
    assert np.array_equal(a, b)


def test_festival_batch_with_quotes_and_backslashes():
    texts = ['She said "stop" twice.', "A back\\slash and (parentheses).", "Done."]
    out = synthesize(Voice("festival", "ked_diphone", "", "male"), texts, SR)
    assert len(out) == 3 and all(len(x) > 0.2 * SR for x in out)


def test_base_voices_have_both_genders():
    for engine in ("espeak-ng", "flite", "festival"):
        voices = base_voices([engine])
        assert {v[0] for v in voices} == {engine}
        assert sum(v[3] == "male" for v in voices) >= 2
        assert sum(v[3] == "female" for v in voices) >= 1
        assert len(set(voices)) == len(voices)
    espeak = base_voices(["espeak-ng"])
    assert len({v[1] for v in espeak}) == 8
    assert len({v[2] for v in espeak if v[3] == "female"}) >= 3
    assert len(base_voices(["espeak-ng", "flite", "festival"])) == len(espeak) + 5 + 3
    with pytest.raises(ValueError):
        base_voices(["nope"])


def test_key_and_check_engines():
    v = Voice("espeak-ng", "en-gb", "f3", "female", 1.05, 0.95)
    assert v.key() == "espeak-ng:en-gb+f3:r1.05:p0.95"
    assert Voice("flite", "slt", "", "female").key() == "flite:slt:r1:p1"
    assert check_engines(["nope"]) == ["unknown TTS engine 'nope'"]
