from lhotse.recipes.utils import normalize_text_chime6

from asr_parallel.text import scoring_text, training_text


def test_kaldi_normalisation_of_chime6_transcripts():
    """The normalisation stage 1 applies (lhotse's, Kaldi-style) does what the recipe relies on."""
    assert normalize_text_chime6("Okay. So, what?", normalize="kaldi") == "okay so what"
    assert normalize_text_chime6("we [inaudible 0:12:34.56] later", normalize="kaldi") == "we [inaudible] later"
    assert normalize_text_chime6("Hello [redacted] there", normalize="kaldi") == ""
    assert normalize_text_chime6("mm- yes - no", normalize="kaldi") == "mm yes no"


def test_training_text_drops_event_tags():
    assert training_text("[laughs] okay so [noise] what") == "okay so what"
    assert training_text("[inaudible]") == ""
    assert training_text("  plain   words ") == "plain words"


def test_scoring_rules():
    assert scoring_text("[laughs] Okay [noise] mm mhm MMM hmm") == "okay hmm hmm hmm hmm"
    assert scoring_text("this is [redacted]") is None
    assert scoring_text("[inaudible]") == ""
    assert scoring_text("mmmm summer") == "mmmm summer"  # only the listed hesitations are mapped


def test_lm_text_leaves_out_the_held_out_sentences(tmp_path):
    """The simulated corpus's LM text: every sentence of the source as lower-case words, less those
    spoken in dev and eval, matched as word sequences (punctuation and case do not hide one)."""
    from asr_parallel.corpus.text import lm_text_sentences

    (tmp_path / "sayings").write_text("Time flies like an arrow.\n%\nFruit flies like a banana!  A third one here.\n%\n"
                                      "Never odd or even.\n")
    (tmp_path / "sayings.dat").write_text("index files are skipped")
    out = lm_text_sentences(["time flies, like an ARROW", "Never odd or even."], tmp_path)
    assert out == ["fruit flies like a banana", "a third one here"]
    assert lm_text_sentences([], tmp_path)[0] == "time flies like an arrow"


def test_lm_text_leaves_out_every_entry_of_a_test_sentence(tmp_path):
    """An entry that holds a test sentence, or a sentence containing one as a run of words, is left
    out whole, in every copy of it and with its other sentences wherever else they occur."""
    from asr_parallel.corpus.text import lm_text_sentences

    (tmp_path / "jokes").write_text(
        "Look at this. The toast fell butter side up.\n%\n"          # a test sentence and a neighbour
        "Never trust a cat. The toast fell butter side up.\n%\n"      # the neighbour elsewhere
        "She said look at this again.\n%\n"                           # holds the test sentence
        "Birds sing at dawn.\n%\nLook at this. Dogs bark at night.\n")  # a later copy of the test sentence
    out = lm_text_sentences(["Look at this!"], tmp_path)
    assert out == ["never trust a cat", "birds sing at dawn"]
