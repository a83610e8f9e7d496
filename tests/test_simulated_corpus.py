"""The simulated corpus: CHiME-6 layout and schema, speakers and voices, determinism, resume."""

import json
import re

import numpy as np
import soundfile as sf

from asr_parallel.corpus import chime6
from asr_parallel.corpus.text import words_of

TIME = re.compile(r"^\d:\d{2}:\d{2}\.\d{2}$")


def test_layout_and_audio_formats(simulated):
    corpus = simulated / "corpus"
    report = chime6.check_corpus(corpus, need_arrays=("dev", "eval"))
    assert report.ok, report.message(corpus)
    summary = json.loads((simulated / "corpus_summary.json").read_text())
    for part, sessions in chime6.SESSIONS.items():
        for session in sessions:
            worn = sorted((corpus / "audio" / part).glob(f"{session}_P*.wav"))
            assert len(worn) == 4
            info = sf.info(worn[0])
            assert (info.samplerate, info.channels) == (16000, 2)
            arrays = sorted((corpus / "audio" / part).glob(f"{session}_U*.CH*.wav"))
            if part == "train":
                assert arrays == []  # arrays are rendered for train only on request
            else:
                assert len(arrays) == 4 * summary["parts"][part]["arrays_per_session"]
                assert sf.info(arrays[0]).channels == 1
                # all files of a session have one length
                lengths = {sf.info(p).frames for p in worn + arrays}
                assert len(lengths) == 1


def test_transcript_schema(simulated):
    corpus = simulated / "corpus"
    tags = set()
    for part, sessions in chime6.SESSIONS.items():
        for session in sessions:
            segments = json.loads(chime6.transcript_file(corpus, part, session).read_text())
            assert segments, session
            for seg in segments:
                keys = {"start_time", "end_time", "words", "speaker", "session_id"}
                if part != "train":
                    keys |= {"ref", "location"}
                    assert seg["location"] in chime6.LOCATIONS
                    assert re.match(r"^U0[1-6]$", seg["ref"])
                assert set(seg) == keys
                assert TIME.match(seg["start_time"]) and TIME.match(seg["end_time"])
                assert chime6.seconds(seg["start_time"]) < chime6.seconds(seg["end_time"])
                assert seg["session_id"] == session and re.match(r"^P\d\d$", seg["speaker"])
                tags |= set(re.findall(r"\[(\w+)", seg["words"]))
    assert {"noise", "laughs", "inaudible", "redacted"} <= tags


def test_speakers_and_voices(simulated):
    voices = json.loads((simulated / "voices.json").read_text())
    corpus = simulated / "corpus"
    by_part = {part: set() for part in chime6.SESSIONS}
    for part, sessions in chime6.SESSIONS.items():
        for session in sessions:
            segs = json.loads(chime6.transcript_file(corpus, part, session).read_text())
            spk = {s["speaker"] for s in segs}
            assert len(spk) <= 4
            by_part[part] |= {p.stem.split("_")[1] for p in (corpus / "audio" / part).glob(f"{session}_P*.wav")}
    assert not (by_part["train"] & (by_part["dev"] | by_part["eval"]))
    assert len(by_part["train"]) == 64 and len(by_part["dev"]) == len(by_part["eval"]) == 8
    keys = [v["key"] for v in voices.values()]
    assert len(set(keys)) == len(keys) == 80  # a distinct voice per speaker
    train = [voices[p] for p in by_part["train"]]
    test = [voices[p] for p in by_part["dev"] | by_part["eval"]]
    train_bases = {(v["engine"], v["base"], v["variant"]) for v in train}
    assert all((v["engine"], v["base"], v["variant"]) in train_bases for v in test)
    for engine in {v["engine"] for v in train}:
        assert {v["gender"] for v in train if v["engine"] == engine} == {"male", "female"}


def test_sentences_are_real_text_and_pools_disjoint(simulated):
    pools = json.loads((simulated / "sentences.json").read_text())
    assert not set(pools["train"]) & set(pools["eval"])
    assert all(s[0].isupper() and s[-1] in ".!?" for s in pools["train"] + pools["eval"])


def test_default_text_pools_keep_test_oov_small():
    """With the default sizes, test sentences are new but their words were seen in training text."""
    from asr_parallel.config import load_config
    from asr_parallel.corpus.text import sentence_pools

    sim = load_config("recipes/chime6_sim.yaml").corpus.simulation
    pools = sentence_pools(sim.train_sentences, sim.eval_sentences, sim.vocabulary_size, sim.min_words,
                           sim.max_words, sim.seed)
    train_vocab = {w for s in pools.train for w in words_of(s)}
    eval_words = [w for s in pools.eval for w in words_of(s)]
    oov = sum(w not in train_vocab for w in eval_words) / len(eval_words)
    assert 0 < oov < 0.05
    assert len(set(pools.train)) == sim.train_sentences and not set(pools.train) & set(pools.eval)


def test_overlap_and_speech_present(simulated):
    summary = json.loads((simulated / "corpus_summary.json").read_text())
    assert 0 < summary["parts"]["train"]["overlap_fraction"] < 0.5
    seg = json.loads(chime6.transcript_file(simulated / "corpus", "dev", "S02").read_text())[0]
    audio, sr = sf.read(chime6.worn_file(simulated / "corpus", "dev", "S02", seg["speaker"]))
    a, b = int(chime6.seconds(seg["start_time"]) * sr), int(chime6.seconds(seg["end_time"]) * sr)
    speech = audio[a:b, 0].std()
    quiet = audio[: int(0.5 * sr), 0].std()  # nobody speaks in the first half second
    assert speech > 4 * quiet


def test_wearer_is_louder_on_own_worn_microphone(simulated):
    """On a worn microphone, the wearer's speech is far louder than the other speakers'."""
    corpus = simulated / "corpus"
    ratios = []
    for part, session in [("train", "S03"), ("dev", "S02"), ("eval", "S01")]:
        segs = json.loads(chime6.transcript_file(corpus, part, session).read_text())
        spans = [(s["speaker"], int(chime6.seconds(s["start_time"]) * 16000), int(chime6.seconds(s["end_time"]) * 16000))
                 for s in segs if "[redacted]" not in s["words"]]
        for wearer in {s for s, _, _ in spans}:
            audio = sf.read(chime6.worn_file(corpus, part, session, wearer))[0][:, 0]
            busy = np.zeros(len(audio), bool)
            for spk, a, b in spans:
                if spk == wearer:
                    busy[a:b] = True
            own = np.concatenate([audio[a:b] for spk, a, b in spans if spk == wearer])
            others = np.concatenate([audio[a:b][~busy[a:b]] for spk, a, b in spans if spk != wearer] + [[]])
            if len(others) > 8000:
                ratios.append(own.std() / others.std())
    assert len(ratios) >= 4
    assert np.median(ratios) > 3, ratios


def test_deterministic_and_resumes(simulated, tmp_path):
    """Regenerating a session from the same seed gives the same files; a rerun resumes."""
    from asr_parallel.config import load_config
    from asr_parallel.corpus.simulate import simulate_corpus
    from chime6_fixture import TINY_SIMULATION

    cfg = load_config("recipes/chime6_sim.yaml", TINY_SIMULATION).corpus.simulation
    corpus = simulated / "corpus"
    victim = chime6.transcript_file(corpus, "eval", "S21")
    before = victim.read_bytes()
    wearer = json.loads(before)[0]["speaker"]
    audio_before = chime6.worn_file(corpus, "eval", "S21", wearer).read_bytes()
    other = chime6.transcript_file(corpus, "train", "S03")
    other_mtime = other.stat().st_mtime_ns
    # Simulate a run killed while S21 was being written: its marker is gone, its files half there.
    (simulated / ".done" / "sim_S21.done").unlink()
    victim.unlink()
    simulate_corpus(corpus, simulated, cfg, num_jobs=1)
    assert victim.read_bytes() == before
    assert chime6.worn_file(corpus, "eval", "S21", wearer).read_bytes() == audio_before
    assert other.stat().st_mtime_ns == other_mtime  # finished sessions were not redone
    assert not list(corpus.rglob(".*tmp*"))


def test_base_voice_limit_keeps_both_genders_per_engine():
    from asr_parallel.config import load_config
    from asr_parallel.corpus.simulate import assign_voices, session_speakers

    cfg = load_config("recipes/chime6_sim.yaml", ["corpus.simulation.base_voice_limit=8"]).corpus.simulation
    voices = assign_voices(cfg)
    assert len({(v.engine, v.base, v.variant) for v in voices.values()}) <= 8
    assert len({v.key() for v in voices.values()}) == 80
    speakers = session_speakers()
    train = [voices[p] for s in chime6.SESSIONS["train"] for p in speakers[s]]
    for engine in cfg.engines:
        assert {v.gender for v in train if v.engine == engine} == {"male", "female"}
