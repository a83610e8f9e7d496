"""asr-parallel: a Kaldi-style CHiME-6 recipe with pluggable parallel-training strategies.

Layout of the library:

* ``config``      typed, validated recipe configuration (YAML files under ``recipes/``);
* ``corpus``      CHiME-6 layout, checks, the simulated corpus and lhotse manifests;
* ``features``    filterbank extraction into lilcom-compressed storage;
* ``tokenizer``   sentencepiece BPE and Kaldi-style symbol tables;
* ``text``        Kaldi/CHiME-6 text normalisation;
* ``utils``       atomic writes, stage markers, logging;
* ``bin``         one entry point per recipe stage (each with ``--help``).
"""

__version__ = "0.1.0"

import os as _os

# oneDNN (torch's CPU kernels) keeps the primitives it built for each shape in a cache of 1024 by
# default. Speech batches come in many shapes, and a training step builds several primitives per
# layer and shape (forward, backward data, backward weights; per precision), so the default cache
# overflows and the steps rebuild primitives they had: measured (RESULTS.md, 2026-12-02, an Intel CPU
# with AMX, one run each) as 21% of the default recipe's training time, same results, and as a
# benchmark loop that runs after another precision's losing 20% to the loop it judges. Set before
# torch builds its first primitive; the environment still decides when it sets the variable.
_os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")
