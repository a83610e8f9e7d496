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
