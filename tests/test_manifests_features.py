"""Stages 1-3 on the tiny simulated corpus: lhotse reads it, counts match, features and BPE."""

import json
from pathlib import Path

from asr_parallel.corpus import chime6
from conftest import run_entry

REPO = Path(__file__).resolve().parents[1]


def test_manifest_counts_match_generator(prepared):
    from lhotse import load_manifest

    corpus = prepared / "corpus"
    summary = json.loads((prepared / "manifests" / "summary.json").read_text())
    for part, sessions in chime6.SESSIONS.items():
        segs = [s for session in sessions
                for s in json.loads(chime6.transcript_file(corpus, part, session).read_text())]
        usable = [s for s in segs if "[redacted]" not in s["words"]]
        cuts = load_manifest(prepared / "manifests" / f"chime6-ihm_cuts_{part}.jsonl.gz")
        assert len(cuts) == len(usable)
        assert summary["splits"][f"ihm/{part}"]["dropped_empty_text"] == len(segs) - len(usable)
        speakers = {s["speaker"] for s in usable}
        assert {c.supervisions[0].speaker for c in cuts} == speakers
        if part != "train":
            mdm = load_manifest(prepared / "manifests" / f"chime6-mdm_cuts_{part}.jsonl.gz")
            assert len(mdm) == len(usable)
            for cut in mdm:
                # the reference array's CH1
                src = Path(cut.recording.sources[cut.channel].source).name
                assert src.endswith(".CH1.wav")
            refs = sorted(s["ref"] for s in usable)
            assert sorted(c.id.split("_")[2].split("-")[0] for c in mdm) == refs


def test_worn_cuts_use_the_wearers_own_microphone(prepared):
    from lhotse import load_manifest

    cuts = load_manifest(prepared / "manifests" / "chime6-ihm_cuts_dev.jsonl.gz")
    for cut in cuts:
        src = Path(cut.recording.sources[cut.channel // 2].source).name
        assert src == f"{cut.recording_id}_{cut.supervisions[0].speaker}.wav"
        assert cut.channel % 2 == 0  # left channel (features.worn_channel = 0)
        text = cut.supervisions[0].text
        assert text == text.lower() and "." not in text and "[redacted]" not in text


def test_feature_shapes(prepared):
    from lhotse import load_manifest

    for name in ["ihm_cuts_train", "ihm_cuts_dev", "mdm_cuts_eval"]:
        cuts = load_manifest(prepared / "fbank" / f"chime6-{name}.jsonl.gz")
        for cut in list(cuts)[:5]:
            feats = cut.load_features()
            assert feats.shape == (cut.num_frames, 80)
            assert abs(cut.num_frames - round(cut.duration * 100)) <= 2
            assert feats.std() > 0.1


def test_tokenizer_tables(prepared):
    import sentencepiece as spm

    lang = prepared / "lang_bpe_60"
    sp = spm.SentencePieceProcessor(model_file=str(lang / "bpe.model"))
    tokens = [line.split() for line in (lang / "tokens.txt").read_text().splitlines()]
    assert tokens[0] == ["<blk>", "0"] and tokens[2] == ["<unk>", "2"]
    assert len(tokens) == sp.get_piece_size()
    words = [line.split()[0] for line in (lang / "words.txt").read_text().splitlines()]
    assert words[:3] == ["<eps>", "!SIL", "<UNK>"] and words[-3:] == ["#0", "<s>", "</s>"]
    lexicon = dict(line.split(" ", 1) for line in (lang / "lexicon.txt").read_text().splitlines())
    assert set(lexicon) == set(words[3:-3])
    assert all("[" not in w for w in lexicon)  # event tags are not words
    w = words[3]
    assert sp.decode(lexicon[w].split()) == w
    # The LM text (decode.lm_extra_text auto, the simulated corpus): the training transcripts, then the
    # text source less every dev and eval sentence; its words are in the word list, and no dev or eval
    # sentence is among the extra lines
    from asr_parallel.corpus.text import words_of

    transcripts = (lang / "transcript_words.txt").read_text().splitlines()
    lm_text = (lang / "lm_text.txt").read_text().splitlines()
    assert lm_text[:len(transcripts)] == transcripts
    extra = lm_text[len(transcripts):]
    assert len(extra) > len(transcripts)
    assert {w for line in extra for w in line.split()} <= set(lexicon)
    held_out = {" ".join(words_of(s)) for s in json.loads((prepared / "sentences.json").read_text())["eval"]}
    assert held_out and not held_out & set(extra)
    assert set(json.loads((prepared / "sentences.json").read_text())["train"]) and any(
        " ".join(words_of(s)) in set(extra) for s in json.loads((prepared / "sentences.json").read_text())["train"])


def test_lm_extra_text_from_a_file_drops_test_sentences(prepared, tmp_path):
    """decode.lm_extra_text naming a file: its lines join the LM text and the word list, normalised
    as transcripts are, except a line equal to a dev or eval transcript; 'none' keeps transcripts only."""
    from lhotse import load_manifest

    from asr_parallel.text import training_text

    dev_text = next(s.text for s in load_manifest(prepared / "manifests" / "chime6-ihm_supervisions_dev.jsonl.gz")
                    if len(training_text(s.text).split()) >= 3 and "[" not in s.text)
    known = [line.split()[0] for line in (prepared / "lang_bpe_60" / "words.txt").read_text().splitlines()][3:-3]
    known = [w for w in known if w.isalpha()]
    new_words = [known[0] + known[1], known[2] + known[3]]  # new words the pieces can spell
    assert not set(new_words) & set(known)
    text = tmp_path / "lm.txt"
    text.write_text(f"{new_words[0].capitalize()}, {new_words[1]}!\n{dev_text.upper()}\n\nSeñor {known[0]}\n")
    r = run_entry("asr_parallel.bin.train_bpe", prepared, "--set", "tokenizer.vocab_size=55",
                  "--set", f"decode.lm_extra_text={text}")
    assert r.returncode == 0, r.stderr[-3000:]
    lang = prepared / "lang_bpe_55"
    transcripts = (lang / "transcript_words.txt").read_text().splitlines()
    # the dev sentence is dropped, and the line with a character the pieces lack ("ñ")
    assert (lang / "lm_text.txt").read_text().splitlines() == transcripts + [" ".join(new_words)]
    assert set(new_words) <= {line.split()[0] for line in (lang / "words.txt").read_text().splitlines()}
    r = run_entry("asr_parallel.bin.train_bpe", prepared, "--set", "tokenizer.vocab_size=55",
                  "--set", "decode.lm_extra_text=none")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (lang / "lm_text.txt").read_text().splitlines() == transcripts
    r = run_entry("asr_parallel.bin.train_bpe", prepared, "--set", "tokenizer.vocab_size=55",
                  "--set", f"decode.lm_extra_text={tmp_path / 'missing.txt'}")
    assert r.returncode == 1 and "missing.txt" in r.stderr and "decode.lm_extra_text" in r.stderr


def test_stages_are_idempotent(prepared):
    before = {p: p.stat().st_mtime_ns for p in (prepared / "fbank").glob("*.jsonl.gz")}
    for step in ["local/prepare_manifests.py", "asr_parallel.bin.compute_fbank"]:
        r = run_entry(step, prepared)
        assert r.returncode == 0 and "already done" in r.stderr
    assert before == {p: p.stat().st_mtime_ns for p in (prepared / "fbank").glob("*.jsonl.gz")}
    # A changed config redoes the stage.
    r = run_entry("asr_parallel.bin.train_bpe", prepared, "--set", "tokenizer.vocab_size=50")
    assert r.returncode == 0 and (prepared / "lang_bpe_50" / "bpe.model").is_file()
