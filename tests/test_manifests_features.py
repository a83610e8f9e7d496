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
    assert not (lang / "lm_text.txt").exists()  # stage 3 is the transcripts' alone


def test_lm_text_graph_of_the_simulated_corpus(prepared):
    """Stage 4 with decode.lm_extra_text auto (the recipe's default) on the simulated corpus: the LM's
    own directory holds the transcripts, then the text source less the entries of the dev and eval
    sentences (every line the pieces can spell), its words in words.txt and lexicon.txt, and the graph;
    no extra line holds a dev or eval sentence."""
    import sentencepiece as spm

    from asr_parallel.corpus.text import lm_text_sentences, words_of

    lang, lm = prepared / "lang_bpe_60", prepared / "lang_bpe_60_lmtext_auto"
    sp = spm.SentencePieceProcessor(model_file=str(lang / "bpe.model"))
    pools = json.loads((prepared / "sentences.json").read_text())
    transcripts = (lang / "transcript_words.txt").read_text().splitlines()
    lm_text = (lm / "lm_text.txt").read_text().splitlines()
    expected = [line for line in lm_text_sentences(pools["eval"])
                if all(sp.piece_to_id(p) != sp.unk_id() for w in line.split() for p in sp.encode(w, out_type=str))]
    assert lm_text == transcripts + expected and len(expected) > len(transcripts)
    held_out = [f" {' '.join(words_of(s))} " for s in pools["eval"]]
    assert not any(h in f" {line} " for line in expected for h in held_out)
    assert any(" ".join(words_of(s)) in set(expected) for s in pools["train"])  # the source's other sentences
    words = [line.split()[0] for line in (lm / "words.txt").read_text().splitlines()][3:-3]
    assert words == sorted({w for line in lm_text for w in line.split()})
    lexicon = dict(line.split(" ", 1) for line in (lm / "lexicon.txt").read_text().splitlines())
    assert set(lexicon) == set(words) and all(sp.decode(lexicon[w].split()) == w for w in words[:50])
    assert (lm / "tokens.txt").read_text() == (lang / "tokens.txt").read_text()
    assert (lm / "TLG_3gram.fst").is_file() and (lm / "G_3gram.arpa").is_file()


def test_lm_extra_text_auto_is_nothing_for_a_real_corpus(tmp_path):
    """``auto`` is decided from the data directory (every stage sees it, --corpus-dir only stages 0-4
    do): the simulated corpus's sentences.json gives its LM text, without it the transcripts alone."""
    from asr_parallel.bin.prepare_graph import extra_lm_text, graph_paths
    from asr_parallel.config import load_config

    cfg = load_config(REPO / "recipes/chime6.yaml", [f"data_dir={tmp_path}"])
    assert cfg.decode.lm_extra_text == "auto"
    assert graph_paths(cfg)[1] == tmp_path / "lang_bpe_500" / "TLG_3gram.fst"
    assert extra_lm_text(cfg) == ([], "none")
    (tmp_path / "sentences.json").write_text(json.dumps({"train": [], "eval": []}))
    assert graph_paths(cfg)[1].parent.name == "lang_bpe_500_lmtext_auto"


def test_lm_extra_text_from_a_file_drops_test_sentences(prepared, tmp_path):
    """decode.lm_extra_text naming a file: its lines join the LM text and the word list, normalised
    as transcripts are, except a line that holds a dev or eval transcript (or equals a short one) and
    a line with a character the pieces lack; the graph goes to a directory named by the file's
    content, so an edited file builds another; 'none' builds stage 3's directory's graph; a missing
    file is an error naming it."""
    import shutil

    from lhotse import load_manifest

    from asr_parallel.text import training_text

    data = tmp_path / "data"  # a copy of the prepared data directory's stage 0-3 outputs
    data.mkdir()
    for name in ("manifests", "fbank", "sentences.json", "corpus"):
        (data / name).symlink_to(prepared / name)
    shutil.copytree(prepared / "lang_bpe_60", data / "lang_bpe_60")
    shutil.copytree(prepared / "lang_bpe_60_lmtext_auto", data / "lang_bpe_60_lmtext_auto")
    shutil.copytree(prepared / ".done", data / ".done")
    dev_text = next(s.text for s in load_manifest(prepared / "manifests" / "chime6-ihm_supervisions_dev.jsonl.gz")
                    if len(training_text(s.text).split()) >= 3 and "[" not in s.text)
    known = [line.split()[0] for line in (data / "lang_bpe_60" / "words.txt").read_text().splitlines()][3:-3]
    known = [w for w in known if w.isalpha()]
    new_words = [known[0] + known[1], known[2] + known[3]]  # new words the pieces can spell
    assert not set(new_words) & set(known)
    text = tmp_path / "lm.txt"
    text.write_text(f"{new_words[0].capitalize()}, {new_words[1]}!\n{dev_text.upper()}\n"
                    f"{known[4]} {dev_text} {known[5]}\n\nSeñor {known[0]}\n")
    r = run_entry("asr_parallel.bin.prepare_graph", data, "--set", f"decode.lm_extra_text={text}")
    assert r.returncode == 0, r.stderr[-3000:]
    dirs = sorted(set(data.glob("lang_bpe_60_lmtext_*")) - {data / "lang_bpe_60_lmtext_auto"})
    assert len(dirs) == 1
    transcripts = (data / "lang_bpe_60" / "transcript_words.txt").read_text().splitlines()
    assert (dirs[0] / "lm_text.txt").read_text().splitlines() == transcripts + [" ".join(new_words)]
    assert set(new_words) <= {line.split()[0] for line in (dirs[0] / "words.txt").read_text().splitlines()}
    assert (dirs[0] / "TLG_3gram.fst").is_file()
    text.write_text(f"{new_words[1]} {new_words[0]}\n")  # edited: stage 4 is redone into another directory
    r = run_entry("asr_parallel.bin.prepare_graph", data, "--set", f"decode.lm_extra_text={text}")
    assert r.returncode == 0 and "already done" not in r.stderr, r.stderr[-3000:]
    assert len(list(data.glob("lang_bpe_60_lmtext_*"))) == 3  # auto's, the file's first and its edit's
    r = run_entry("asr_parallel.bin.prepare_graph", data, "--set", "decode.lm_extra_text=none")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (data / "lang_bpe_60" / "TLG_3gram.fst").is_file()
    # one marker per graph: the default's (auto) and this one are both still built, whatever ran last,
    # and other search options do not rebuild a graph
    for lm_text in ("auto", "none", "auto"):
        r = run_entry("asr_parallel.bin.prepare_graph", data, "--set", f"decode.lm_extra_text={lm_text}",
                      "--set", "decode.beam=9")
        assert r.returncode == 0 and "already done" in r.stderr, (lm_text, r.stderr[-3000:])
    (data / "lang_bpe_60" / "TLG_3gram.fst").unlink()  # a graph gone is built again
    r = run_entry("asr_parallel.bin.prepare_graph", data, "--set", "decode.lm_extra_text=none")
    assert r.returncode == 0 and "already done" not in r.stderr and (data / "lang_bpe_60" / "TLG_3gram.fst").is_file()
    r = run_entry("asr_parallel.bin.prepare_graph", data, "--set", f"decode.lm_extra_text={tmp_path / 'missing.txt'}")
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
