"""WFST decoding of CTC outputs over the TLG graph with kaldi-decoder's ``FasterDecoder``.

The network's log-probabilities are the acoustic scores; the language model weight lambda enters as
Kaldi's acoustic scale 1/lambda (maximising AM + lambda*LM is maximising AM/lambda + LM), so one
graph serves every weight tried. ``blank_penalty`` is subtracted from the blank's log-probability
(favouring emitted units). Beam and active-state limits are the decoder's (Kaldi's
``faster-decoder`` options).
"""

from __future__ import annotations

import numpy as np


class WfstDecoder:
    def __init__(self, graph_path, words_path, beam: float = 16.0, max_active: int = 7000, min_active: int = 20):
        import kaldi_decoder
        import kaldifst

        from asr_parallel.decode.graph import read_symbols

        self.graph = kaldifst.StdVectorFst.read(str(graph_path))
        self.words = {i: w for w, i in read_symbols(words_path).items()}
        self.options = kaldi_decoder.FasterDecoderOptions(beam=beam, max_active=max_active, min_active=min_active)

    def decode(self, log_probs: np.ndarray, lm_weight: float = 1.0, blank_penalty: float = 0.0) -> list[str]:
        """(T, V) log-probabilities of one utterance -> words of the best path ([] if none)."""
        import kaldi_decoder
        import kaldifst

        scores = np.ascontiguousarray(log_probs, dtype=np.float32).copy()
        if blank_penalty:
            scores[:, 0] -= blank_penalty
        scores /= lm_weight
        decoder = kaldi_decoder.FasterDecoder(self.graph, self.options)
        decoder.decode(kaldi_decoder.DecodableCtc(scores))
        ok, best = decoder.get_best_path(use_final_probs=decoder.reached_final())
        if not ok:
            return []
        ok, _, word_ids, _ = kaldifst.get_linear_symbol_sequence(best)
        return [self.words[w] for w in word_ids] if ok else []
