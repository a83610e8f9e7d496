"""Bootstrap confidence intervals and paired tests of WER (asr_parallel/score/significance.py) on
hand-checkable error counts."""

import numpy as np
import pytest

from asr_parallel.score.significance import (
    PairedComparison,
    UtteranceScores,
    bootstrap_wer,
    paired_bootstrap,
    scores_from_rows,
)


def scores(errors, words, ids=None, speakers=None, sessions=None) -> UtteranceScores:
    n = len(errors)
    ids = ids or [f"u{i:04d}" for i in range(n)]
    return UtteranceScores(tuple(ids), np.asarray(errors, dtype=np.int64), np.asarray(words, dtype=np.int64),
                           tuple(speakers or ["P01"] * n), tuple(sessions or ["S02"] * n))


def random_scores(n, seed=1, p=0.25):
    rng = np.random.default_rng(seed)
    words = rng.integers(3, 12, size=n)
    return scores(rng.binomial(words, p), words)


def test_point_estimate_is_errors_over_words_and_inside_its_interval():
    s = scores([1, 0, 2, 1], [4, 5, 6, 5])  # 4 errors / 20 words
    ci = bootstrap_wer(s)
    assert ci.wer == pytest.approx(20.0)
    assert ci.low < 20.0 < ci.high and ci.contains(20.0)
    assert ci.resamples == 1000 and ci.level == 0.95 and ci.unit == "utterance" and ci.units == 4
    # every resampled WER lies between the best and the worst single utterance
    assert 0.0 <= ci.low and ci.high <= 100 * 2 / 6


def test_same_rate_everywhere_gives_a_point_interval():
    ci = bootstrap_wer(scores([1, 2, 3], [4, 8, 12]))  # 25% in every utterance
    assert ci.low == pytest.approx(25.0) and ci.high == pytest.approx(25.0)


def test_interval_matches_the_binomial_one():
    """One word per utterance, errors with probability p: the WER is a proportion, whose 95% interval
    is p +- 1.96 sqrt(p (1 - p) / n)."""
    n, wrong = 400, 100
    s = scores([1] * wrong + [0] * (n - wrong), [1] * n)
    ci = bootstrap_wer(s, num_resamples=4000)
    half = 100 * 1.96 * np.sqrt(0.25 * 0.75 / n)  # 4.24 points
    assert (ci.high - ci.low) / 2 == pytest.approx(half, rel=0.12)
    assert (ci.low + ci.high) / 2 == pytest.approx(25.0, abs=0.6)


def test_width_shrinks_as_one_over_sqrt_n():
    s = random_scores(200)
    width = bootstrap_wer(s).high - bootstrap_wer(s).low
    for k in (4, 16):
        big = scores(np.tile(s.errors, k), np.tile(s.words, k))
        ci = bootstrap_wer(big)
        assert ci.wer == pytest.approx(s.wer)
        assert (ci.high - ci.low) / width == pytest.approx(1 / np.sqrt(k), rel=0.2)


def test_seed_gives_identical_output_and_another_seed_another():
    s = random_scores(300)
    assert bootstrap_wer(s, seed=7) == bootstrap_wer(s, seed=7)
    assert bootstrap_wer(s, seed=7) != bootstrap_wer(s, seed=8)
    b = scores(np.random.default_rng(2).binomial(s.words, 0.2), s.words)
    assert paired_bootstrap(s, b, seed=3) == paired_bootstrap(s, b, seed=3)


def test_block_bootstrap_resamples_whole_sessions():
    """Two sessions at 10% and 30%: a resampled set is AA (10%), AB (20%) or BB (30%), each pair with
    probability 1/4 or more, so the 95% interval is [10, 30]."""
    s = scores([1, 0, 2, 1], [5, 5, 5, 5], sessions=["S02", "S02", "S09", "S09"])
    ci = bootstrap_wer(s, unit="session")
    assert ci.units == 2 and ci.wer == pytest.approx(20.0)
    assert (ci.low, ci.high) == (pytest.approx(10.0), pytest.approx(30.0))
    # over utterances the interval is narrower at the top: 4 of 20 words at most... by utterance, 40% is
    # reachable (the 2-error utterance drawn 4 times) but has probability (1/4)^4
    assert bootstrap_wer(s, unit="utterance").units == 4
    with pytest.raises(ValueError, match="unknown resampling unit 'room'"):
        bootstrap_wer(s, unit="room")


def test_identical_systems_tie():
    s = random_scores(300)
    t = paired_bootstrap(s, s)
    assert t.difference == 0.0 and t.low == 0.0 and t.high == 0.0
    assert t.poi == 0.5 and t.ties == 1.0 and t.verdict == "tie"


def test_better_on_every_utterance_has_poi_one():
    a = random_scores(50, p=0.4)
    a = scores(a.errors + 1, a.words + 1)  # at least one error everywhere
    b = scores(a.errors - 1, a.words)
    t = paired_bootstrap(a, b)
    assert t.poi == 1.0 and t.ties == 0.0
    assert t.high < 0 and t.verdict == "better"
    assert t.difference == pytest.approx(b.wer - a.wer)
    back = paired_bootstrap(b, a)
    assert back.poi == 0.0 and back.low > 0 and back.verdict == "worse"


def test_paired_test_on_two_utterances():
    """A errs on u0, B on u1: a resampled pair is {u0, u0} (B better), {u1, u1} (B worse) or mixed
    (tie), with probabilities 1/4, 1/4, 1/2: poi = 1/4 + 1/2 * 1/2 = 0.5, ties 0.5."""
    t = paired_bootstrap(scores([1, 0], [1, 1]), scores([0, 1], [1, 1]), num_resamples=8000)
    assert t.ties == pytest.approx(0.5, abs=0.03)
    assert t.poi == pytest.approx(0.5, abs=0.03)
    assert (t.low, t.high) == (-100.0, 100.0) and t.verdict == "tie"


def test_pairing_follows_ids_not_order():
    a = scores([2, 0, 1], [4, 4, 4], ids=["x", "y", "z"])
    b = scores([1, 0, 2], [4, 4, 4], ids=["z", "y", "x"])  # the same errors, listed in another order
    t = paired_bootstrap(a, b)
    assert t.ties == 1.0 and t.verdict == "tie"


def test_different_utterances_are_refused_by_name():
    a = scores([1, 0, 1], [3, 3, 3], ids=["S02_a", "S02_b", "S02_c"])
    b = scores([1, 0, 1], [3, 3, 3], ids=["S02_a", "S02_b", "S09_d"])
    with pytest.raises(ValueError, match=r"1 missing from base: S09_d.*1 missing from new: S02_c|"
                                         r"1 missing from new: S02_c.*1 missing from base: S09_d"):
        paired_bootstrap(a, b, name_a="base", name_b="new")
    c = scores([1, 0, 1], [3, 4, 3], ids=["S02_a", "S02_b", "S02_c"])
    with pytest.raises(ValueError, match="different references .* 'S02_b' \\(3 against 4 words\\)"):
        paired_bootstrap(a, c)


def test_verdict_of_the_interval():
    def verdict(low, high):
        return PairedComparison(10.0, 10.0 + (low + high) / 2, low, high, 0.5, 0.0, 0.95, 1000, "utterance",
                                10).verdict

    assert verdict(-1.0, 0.5) == "tie" and verdict(0.0, 2.0) == "tie"
    assert verdict(-2.0, -0.1) == "better" and verdict(0.1, 2.0) == "worse"


def test_scores_of_decoded_rows_use_chime6_scoring():
    rows = [{"id": "a", "ref": "[laughs] Hello there.", "hyp": "hello", "speaker": "P05", "session": "S02"},
            {"id": "b", "ref": "mm yes", "hyp": "hmm yes", "speaker": "P06", "session": "S02"},
            {"id": "c", "ref": "[redacted] stuff", "hyp": "stuff", "speaker": "P06", "session": "S02"}]
    s = scores_from_rows(rows)
    assert s.ids == ("a", "b") and s.errors.tolist() == [1, 0] and s.words.tolist() == [2, 2]
    assert s.wer == 25.0 and s.speakers == ("P05", "P06")
    with pytest.raises(ValueError, match="utterance 'a' appears twice"):
        scores_from_rows(rows + rows[:1], "dev_ihm.jsonl")


def test_bad_arguments():
    s = random_scores(10)
    with pytest.raises(ValueError, match="level"):
        bootstrap_wer(s, level=95)
    with pytest.raises(ValueError, match="num_resamples"):
        bootstrap_wer(s, num_resamples=0)
    with pytest.raises(ValueError, match="no scored utterances"):
        bootstrap_wer(scores([], []))
