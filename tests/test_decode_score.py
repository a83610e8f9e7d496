"""Graph building and WFST decoding with a known answer; greedy CTC; scoring rules; the report."""

import json
import math

import numpy as np
import pytest
import torch

from asr_parallel.decode.graph import build_graph, lexicon_with_disambig, train_lm
from asr_parallel.decode.greedy import greedy_ctc
from asr_parallel.decode.wfst import WfstDecoder
from asr_parallel.score.report import score_experiment
from asr_parallel.score.wer import corpus_errors, utterance_errors

UNITS = ["<blk>", "<sos/eos>", "<unk>", "▁a", "▁b", "c"]
LEXICON = {"a": ["▁a"], "ac": ["▁a", "c"], "b": ["▁b"]}


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory):
    lang = tmp_path_factory.mktemp("lang")
    (lang / "tokens.txt").write_text("".join(f"{u} {i}\n" for i, u in enumerate(UNITS)))
    words = ["<eps>", "!SIL", "<UNK>", "a", "ac", "b", "#0", "<s>", "</s>"]
    (lang / "words.txt").write_text("".join(f"{w} {i}\n" for i, w in enumerate(words)))
    (lang / "lexicon.txt").write_text("".join(f"{w} {' '.join(p)}\n" for w, p in LEXICON.items()))
    train_lm(["a b", "ac b", "b a", "a b a"], 2, lang / "G.arpa")
    info = build_graph(lang, lang / "G.arpa", lang / "TLG.fst")
    assert info["disambig"] == 2  # #0 and #1 (for "a", a prefix of "ac")
    return lang


def posteriors(units: list[str], frames_per_unit: int = 3) -> np.ndarray:
    """Log-probabilities that spell ``units`` with blanks between them."""
    ids = [UNITS.index(u) for u in units]
    T = frames_per_unit * len(ids) + 2
    lp = np.full((T, len(UNITS)), math.log(0.01), np.float32)
    lp[:, 0] = math.log(0.95)
    for i, u in enumerate(ids):
        t = 1 + frames_per_unit * i
        lp[t] = math.log(0.01)
        lp[t, u] = math.log(0.95)
    return lp


def test_lexicon_disambiguation_marks_prefixes():
    lex, n = lexicon_with_disambig([("a", ["x"]), ("ab", ["x", "y"]), ("c", ["z"]), ("d", ["z"])])
    assert dict((w, p) for w, p in lex) == {"a": ["x", "#1"], "ab": ["x", "y"], "c": ["z", "#1"], "d": ["z", "#2"]}
    assert n == 2


def test_wfst_decoding_known_answers(tiny_graph):
    dec = WfstDecoder(tiny_graph / "TLG.fst", tiny_graph / "words.txt")
    assert dec.decode(posteriors(["▁a", "c", "▁b"])) == ["ac", "b"]
    assert dec.decode(posteriors(["▁a", "▁b"])) == ["a", "b"]
    assert dec.decode(posteriors(["▁b", "▁a"])) == ["b", "a"]
    # A repeated unit needs a blank between its two occurrences: "b b" is two words here.
    assert dec.decode(posteriors(["▁b", "▁b"])) == ["b", "b"]


def test_lm_weight_breaks_an_acoustic_tie(tiny_graph):
    """Equal acoustic evidence for "a b" and "ac b": "a b" is twice as frequent in the LM text."""
    lp = posteriors(["▁a", "c", "▁b"])
    t = 4  # the frame that carries "c"
    lp[t, 0] = lp[t, UNITS.index("c")] = math.log(0.49)
    dec = WfstDecoder(tiny_graph / "TLG.fst", tiny_graph / "words.txt")
    assert dec.decode(lp, lm_weight=1.0) == ["a", "b"]


def test_greedy_ctc():
    lp = torch.from_numpy(posteriors(["▁a", "▁a", "c"], frames_per_unit=2))[None]
    assert greedy_ctc(lp, torch.tensor([lp.shape[1]])) == [[3, 3, 5]]
    assert greedy_ctc(lp, torch.tensor([2])) == [[3]]


def test_scoring_rules_hand_computed():
    c = utterance_errors("Okay so what [laughs]", "okay what now")
    assert (c.words, c.ins, c.dels, c.subs) == (3, 1, 1, 0)
    assert c.kaldi() == "%WER 66.67 [ 2 / 3, 1 ins, 1 del, 0 sub ]"
    c = utterance_errors("mm yes [noise] please", "hmm yes police")
    assert (c.words, c.errors, c.subs) == (3, 1, 1)
    assert utterance_errors("this is [redacted]", "anything") is None
    total = corpus_errors([("a b c", "a x c"), ("[redacted]", "z"), ("d e", "")])
    assert (total.words, total.subs, total.dels, total.utterances) == (5, 1, 2, 2)
    assert total.wer == pytest.approx(60.0)


def test_report_chooses_lm_weight_on_dev(tmp_path):
    def write(method, name, rows):
        d = tmp_path / method
        d.mkdir(exist_ok=True)
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def row(ref, hyp, session="S02", location="kitchen"):
        return {"id": "x", "session": session, "speaker": "P05", "location": location, "ref": ref, "hyp": hyp}

    write("wfst_lmwt0.5", "dev_ihm", [row("a b c d", "a b")])             # 50 %
    write("wfst_lmwt0.5", "eval_ihm", [row("a b", "a b", "S01")])         # 0 %
    write("wfst_lmwt0.9", "dev_ihm", [row("a b c d", "a b c", "S09", "dining")])  # 25 %: best on dev
    write("wfst_lmwt0.9", "eval_ihm", [row("a b", "a", "S01")])          # 50 %, reported for eval
    write("greedy", "dev_mdm", [row("a b", "a b"), row("c", "d", "S09", "living")])
    results, report = score_experiment(tmp_path)
    assert results["wfst"]["lm_weight"] == 0.9
    assert results["wfst"]["dev"]["worn"]["total"]["wer"] == 25.0
    assert results["wfst"]["eval"]["worn"]["total"]["wer"] == 50.0
    assert results["greedy"]["dev"]["array"]["sessions"]["S09"]["wer"] == 100.0
    assert results["greedy"]["dev"]["array"]["locations"]["kitchen"]["wer"] == 0.0
    assert "%WER 25.00 [ 1 / 4, 0 ins, 1 del, 0 sub ]" in report


def test_blank_penalty_turns_a_weak_unit_into_a_word(tiny_graph):
    """A frame where "▁b" is less likely than blank: decoded as blank without a penalty, and as "b"
    once the blank's log-probability is lowered by more than the gap."""
    dec = WfstDecoder(tiny_graph / "TLG.fst", tiny_graph / "words.txt")
    lp = posteriors(["▁a", "▁b"])
    lp[4] = math.log(0.01)
    lp[4, 0], lp[4, UNITS.index("▁b")] = math.log(0.75), math.log(0.2)
    assert dec.decode(lp, lm_weight=0.5) == ["a"]
    assert dec.decode(lp, lm_weight=0.5, blank_penalty=3.0) == ["a", "b"]


def _write_decodings(root, method, name, rows):
    d = root / method
    d.mkdir(exist_ok=True)
    (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _row(ref, hyp, session="S02", location="kitchen"):
    return {"id": "x", "session": session, "speaker": "P05", "location": location, "ref": ref, "hyp": hyp}


def test_report_follows_stage_6s_choice_of_weight_and_penalty(tmp_path):
    """With decode/wfst_choice.json the report gives the chosen pair's figures (here not the lowest
    dev WER by name order: two pairs tie on dev), dev worn by LM weight at the chosen penalty and by
    pair; a choice naming a decoding that is not there is an error naming the file."""
    from asr_parallel.bin.compare import decode_method

    _write_decodings(tmp_path, "wfst_lmwt0.5", "dev_ihm", [_row("a b c d", "a b")])           # 50 %
    _write_decodings(tmp_path, "wfst_lmwt0.5_bp3", "dev_ihm", [_row("a b c d", "a b c")])     # 25 %
    _write_decodings(tmp_path, "wfst_lmwt1_bp3", "dev_ihm", [_row("a b c d", "a b c")])       # 25 %, chosen
    _write_decodings(tmp_path, "wfst_lmwt1_bp3", "eval_ihm", [_row("a b", "a", "S01")])       # 50 %
    choice = {"lm_weight": 1.0, "blank_penalty": 3.0, "dir": "wfst_lmwt1_bp3"}
    (tmp_path / "wfst_choice.json").write_text(json.dumps(choice))
    results, report = score_experiment(tmp_path)
    assert (results["wfst"]["lm_weight"], results["wfst"]["blank_penalty"]) == (1.0, 3.0)
    assert results["wfst"]["eval"]["worn"]["total"]["wer"] == 50.0
    assert results["wfst"]["dev_worn_wer_by_lm_weight"] == {"0.5": 25.0, "1": 25.0}
    assert results["wfst"]["dev_worn_wer_by_setting"] == {"lmwt0.5": 50.0, "lmwt0.5_bp3": 25.0, "lmwt1_bp3": 25.0}
    assert "LM weight 1, blank penalty 3, chosen on dev worn" in report
    assert decode_method(results) == "wfst_lmwt1_bp3"
    assert decode_method({"wfst": {"lm_weight": 0.8}}) == "wfst_lmwt0.8"  # a results.json from before
    (tmp_path / "wfst_choice.json").write_text(json.dumps({**choice, "dir": "wfst_lmwt2_bp3"}))
    with pytest.raises(ValueError, match="wfst_choice.json.*wfst_lmwt2_bp3"):
        score_experiment(tmp_path)
