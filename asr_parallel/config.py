"""Typed, validated recipe configuration.

A recipe config is a YAML file under ``recipes/`` whose keys mirror the dataclasses below. Loading
checks every key and every value's type: an unknown key or a value of the wrong type stops with a
:class:`ConfigError` that names the key and the file, and for unknown keys lists the valid ones.

A config may start from another with ``base: other.yaml`` (resolved relative to the file); its own
keys then override the base's, section by section. Command-line overrides use dotted keys,
``corpus.simulation.seed=3``, and go through the same validation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from asr_parallel.typed import ConfigError, build as _build


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class SimulationConfig:
    """Size and acoustics of the simulated CHiME-6 corpus (stage 0 without ``--corpus-dir``)."""

    seed: int = 20201130
    # Minutes of conversation per session; CHiME-6's sessions are about 2.5 h each.
    train_minutes_per_session: float = 6.0
    eval_minutes_per_session: float = 4.0  # dev and eval sessions
    # Far-field arrays U01..U0N (CHiME-6 has 6; S01 lacks U03 and S05 lacks U04 as in the real corpus).
    num_arrays: int = 2
    # Arrays dominate disk use (4 channels each): render them for dev and eval, for train on request.
    train_arrays: bool = False
    # Speech synthesis engines whose voices are used; every engine gives male and female voices.
    engines: list[str] = field(default_factory=lambda: ["espeak-ng", "flite", "festival"])
    # Distinct base voices (engine, voice, variant) the 80 speakers are drawn from; 0 = all of them
    # (152 with the three engines). Rate and pitch make every speaker's voice distinct regardless.
    base_voice_limit: int = 0
    # Distinct sentences in the training text pool (dev and eval draw from a disjoint pool). The
    # training sessions together go through their pool; size it near the number of training turns.
    train_sentences: int = 2400
    eval_sentences: int = 500
    # Sentences are restricted to this many most frequent words of the text source, and at most this
    # fraction of eval sentences holds a word no training sentence has: the test sets'
    # out-of-vocabulary rate stays small enough for WER to be meaningful.
    vocabulary_size: int = 3000
    eval_oov_sentence_fraction: float = 0.1
    min_words: int = 3
    max_words: int = 16
    # Conversation: probability that a turn overlaps the previous one, and silence between turns.
    overlap_probability: float = 0.2
    max_overlap_seconds: float = 1.5
    mean_pause_seconds: float = 0.4
    backchannel_probability: float = 0.08
    # Annotation tags as in the real transcripts.
    tag_probability: float = 0.04
    redacted_probability: float = 0.01
    # Room acoustics: reverberation time range (s) and diffuse noise level at the arrays (SNR, dB).
    rt60_range: list[float] = field(default_factory=lambda: [0.25, 0.6])
    snr_db_range: list[float] = field(default_factory=lambda: [8.0, 20.0])
    # Attenuation of the other speakers at a worn microphone, beyond what distance gives (dB).
    worn_crosstalk_db: float = 6.0


@dataclass
class CorpusConfig:
    """Where the corpus comes from: a real CHiME-6 copy (``dir``) or the simulation."""

    dir: Optional[str] = None  # a real CHiME-6 directory; None = simulate under data_dir/corpus
    simulation: SimulationConfig = field(default_factory=SimulationConfig)


@dataclass
class ManifestConfig:
    """Stage 1: lhotse manifests."""

    mics: list[str] = field(default_factory=lambda: ["ihm", "mdm"])
    # Parts whose array (mdm) manifests are prepared; train needs arrays rendered or a real corpus.
    mdm_parts: list[str] = field(default_factory=lambda: ["dev", "eval"])


@dataclass
class FeatureConfig:
    """Stage 2: log-mel filterbanks."""

    num_mel_bins: int = 80
    num_jobs: int = 2
    # Array channel used for evaluation on array microphones (0 = CH1); enhancement comes later.
    reference_channel: int = 0
    # Worn microphones are binaural; the channel used (0 = left).
    worn_channel: int = 0


@dataclass
class TokenizerConfig:
    """Stage 3: sentencepiece model."""

    vocab_size: int = 300
    model_type: Literal["bpe", "unigram", "char"] = "bpe"
    character_coverage: float = 1.0


@dataclass
class MlpConfig:
    """The survey's DNN: ``num_layers`` equal-width layers over spliced frames."""

    num_layers: int = 6
    hidden_dim: int = 1024
    context_left: int = 5
    context_right: int = 5
    subsample: int = 3
    dropout: float = 0.1
    activation: Literal["relu", "sigmoid", "tanh"] = "relu"  # sigmoid: the DNNs of Chen et al. 2012


@dataclass
class TdnnConfig:
    """Kaldi-like TDNN (TDNN-F when ``bottleneck_dim`` > 0)."""

    hidden_dim: int = 512
    kernels: list[int] = field(default_factory=lambda: [5, 3, 3, 3, 3, 3, 3])
    dilations: list[int] = field(default_factory=lambda: [1, 1, 1, 1, 1, 1, 1])
    subsample: int = 3
    subsample_layer: int = 1
    bottleneck_dim: int = 0
    dropout: float = 0.1


@dataclass
class ConformerConfig:
    """Conformer blocks (torchaudio's, or the project's with rotary positions) behind a x4
    convolutional subsampling."""

    model_dim: int = 144
    num_layers: int = 6
    num_heads: int = 4
    ffn_dim: int = 576
    kernel: int = 15
    dropout: float = 0.1
    layers_per_stage: int = 1
    # Normalisation inside the convolution module (asr_parallel/models/conformer.py): "layer" over the
    # channels of every frame, padding zeroed ahead of the depthwise convolution (an utterance's output
    # depends on nothing else in its batch); "batch" torchaudio's BatchNorm1d (statistics over the
    # batch, padding included: configs from before this option); "group" torchaudio's GroupNorm.
    conv_norm: Literal["layer", "batch", "group"] = "layer"
    # "torchaudio": torchaudio's ConformerLayer (no positional encoding); "rotary": the project's block
    # with rotary positions and scaled_dot_product_attention (asr_parallel/models/conformer.py), the
    # default recipe's; torchaudio's stays the dataclass default so that older configs keep their block
    block: Literal["torchaudio", "rotary"] = "torchaudio"


@dataclass
class ModelConfig:
    name: Literal["mlp", "tdnn", "conformer"] = "conformer"
    mlp: MlpConfig = field(default_factory=MlpConfig)
    tdnn: TdnnConfig = field(default_factory=TdnnConfig)
    conformer: ConformerConfig = field(default_factory=ConformerConfig)


@dataclass
class TrainConfig:
    """Training loop: data, optimiser, schedule, checkpoints, logging."""

    world_size: int = 1  # processes (ranks); 1 = a single process without torch.distributed
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = True  # bf16 autocast on GPU
    # bf16 autocast on CPU ranks: auto = where the CPU has AVX512-BF16 or AMX (native; measured on
    # an AVX512-BF16 CPU: 1.1-1.2x float32, the recipe's WERs ties; on AMX 1.12-1.16x; RESULTS.md),
    # true = always (emulated, with a warning, elsewhere), false = never
    bf16_cpu: bool | Literal["auto"] = "auto"
    # float32 matmuls on GPU in TF32 (asr_parallel.train.step.set_tf32): the step's precision with
    # bf16 false, and what stays float32 under autocast; off = torch's default (float32 matmuls;
    # cuDNN's convolutions are TF32 by torch's default either way)
    tf32: bool = False
    seed: int = 42
    epochs: int = 10
    max_duration: float = 200.0  # seconds of audio per batch per rank (lhotse bucketing sampler)
    num_buckets: int = 10
    # data-loader worker processes per rank; "auto": none on CPU ranks (the loader is far faster than
    # a CPU step: bench_loader), and up to 4 on GPU ranks (asr_parallel.train.data.loader_workers)
    num_workers: int | Literal["auto"] = "auto"
    # > 1: every batch's frames padded up to a rung of a geometric ladder (multiples of 16 frames,
    # each rung at least pad_growth times the one before), so that an epoch has a few frame lengths
    # (towards static shapes for compilation; batch sizes still vary); 1.0: to the longest utterance
    pad_growth: float = 1.0
    # read the training manifest lazily (lhotse's load_manifest_lazy): the manifest is not held in
    # memory (the epoch's batch plan is), and it is shuffled within lhotse's buffer rather than whole
    # (so a run differs from an eager one); for corpora too large to hold per rank. The simulated
    # corpus is read eagerly by default.
    lazy_manifests: bool = False
    spec_augment: bool = True
    # torch.compile every stage of the model (nn.Module.compile, parameter names unchanged) with this
    # backend ("inductor": generated kernels; "aot_eager": the captured graphs run by eager kernels).
    # The conformer's rotary block compiles into one graph per stage (tested with fullgraph=True).
    compile: bool = False
    compile_backend: str = "inductor"
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = 2e-3
    momentum: float = 0.9  # explicit momentum: SGD's momentum, Adam/AdamW's beta1 (0.9, their default)
    weight_decay: float = 1e-3
    scheduler: Literal["constant", "warmup_cosine", "warmup_linear"] = "warmup_cosine"
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05
    grad_clip: float = 5.0
    checkpoint_every_steps: int = 200
    keep_checkpoints: int = 3
    max_bad_batches: int = 20  # consecutive NaN/inf losses before the run stops
    log_every_steps: int = 10
    max_steps: int = 0  # stop after this many optimizer steps (0 = no limit; for tests and benchmarks)
    time_limit_minutes: float = 0.0  # stop at the end of the first epoch past this (0 = no limit)
    # > 1: spread the ranks over this many emulated nodes on this machine (local/emulate_cluster.sh:
    # network namespaces, links limited to link_rate; needs root, else one node with a warning)
    emulate_nodes: int = 0
    link_rate: str = "100mbit"  # tc syntax; or one per node, comma-separated (e.g. 500mbit,100mbit: a slow node)
    # ranks on each emulated node, in node order (e.g. [2, 1]: ranks 0-1 on node 0, rank 2 on node 1);
    # [] = world_size / emulate_nodes on every node
    ranks_per_node: list[int] = field(default_factory=list)
    average_last_checkpoints: int = 1  # average the model over the last N epoch checkpoints for decoding
    # Stragglers: {rank: factor} makes each named rank take ``factor`` times its own time per step
    # (it waits factor - 1 times the step's time after each step), e.g. {1: 2.0}
    slow_ranks: dict = field(default_factory=dict)
    # Launch and faults (local/launch_train.sh; operational: they do not change what is computed).
    # launcher: "auto" = one process for world_size 1, torchrun otherwise, SLURM's srun inside a SLURM
    # allocation of more than one node; "local" = one process; "torchrun"; "slurm" = srun, one torchrun
    # per node, nodes and node rank from SLURM_* variables.
    launcher: Literal["auto", "local", "torchrun", "slurm"] = "auto"
    nnodes: int = 1  # real nodes; each runs world_size / nnodes ranks
    node_rank: int = -1  # this node's rank; -1 = assigned by the c10d rendezvous
    rdzv_endpoint: str = ""  # HOST:PORT of the rendezvous (node 0's address), needed with nnodes > 1
    rdzv_backend: Literal["c10d", "static"] = "c10d"  # static: every node gives its node_rank
    rdzv_id: str = "asr-parallel"  # the same on every node of one run, different between runs
    max_restarts: int = 3  # torchrun restarts the whole group this often after a rank fails
    collective_timeout: float = 600.0  # seconds a collective (or barrier) waits for the other ranks
    # the process group: "auto" = NCCL for CUDA tensors with gloo beside it for CPU ones on GPU ranks
    # (cpu:gloo,cuda:nccl), gloo on CPU ranks; "gloo" = gloo for everything, which lets several ranks
    # share a GPU (NCCL refuses two ranks on one device; ranks take the node's GPUs in turn) at
    # gloo's speed: all-reduces stage CUDA tensors through the host, and the pipelines send through
    # host copies (asr_parallel.strategies.pipeline.p2p_via_host). For tests and small hosts.
    dist_backend: Literal["auto", "gloo"] = "auto"


@dataclass
class DecodeConfig:
    """Language model, decoding graph and search."""

    lm_order: int = 3
    methods: list[str] = field(default_factory=lambda: ["greedy", "wfst"])
    beam: float = 16.0
    max_active: int = 7000
    min_active: int = 20
    # Tried on dev; the best by dev worn-microphone WER is applied to eval, as Kaldi's scoring does.
    lm_weights: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9, 1.1])
    # subtracted from the CTC blank's log-probability before the search (icefall's blank penalty:
    # fewer deletions); a list is tried on dev worn together with lm_weights, every pair, and the
    # best pair decodes the other sets (asr_parallel.decode.run)
    blank_penalty: float | list[float] = 0.0
    batch_size: int = 16
    # Text for the word LM and its lexicon besides the training transcripts (stage 4, which builds its
    # graph in data_dir/lang_bpe_N_lmtext_<tag>/): "auto" = where the data directory holds the
    # simulated corpus, its text source less every entry that holds a dev or eval sentence (in-domain
    # text, see asr_parallel.corpus.text.lm_text_sentences), nothing for a real corpus; "none" =
    # transcripts only (stage 3's lang directory); or a file of one sentence per line, relative to the
    # directory run.sh runs in (its lines holding a dev or eval transcript are dropped).
    lm_extra_text: str = "auto"

    def blank_penalties(self) -> list[float]:
        return [float(x) for x in self.blank_penalty] if isinstance(self.blank_penalty, list) else [
            float(self.blank_penalty)]


@dataclass
class CompareConfig:
    """Stage 8: several training runs side by side (each trained, decoded and scored as stages 5-7,
    finished runs reused). Each run is a mapping: ``strategy`` (a strategy section), ``world_size``
    (ranks, default 1), ``overrides`` (extra ``key=value`` settings, e.g. ``model.name=mlp``),
    ``label`` (a name for tables and plots) and, with ``seeds``, ``seeds`` (the subset of them this
    run is trained with)."""

    runs: list[dict] = field(default_factory=list)
    target_dev_wer: float = 60.0  # greedy dev worn-microphone WER (%) for "time to reach"
    # The run every other is tested against (paired bootstrap): a run's label, or the strategy name of
    # exactly one run; "" = the first run.
    baseline: str = ""
    # Train every run once per seed (train.seed=<s>, into exp_dir/seed<s>/, labels <label>_seed<s>) and
    # report the mean and spread of WER over seeds; [] = one run each with the config's train.seed.
    # A run with its own ``seeds`` (a subset) is trained with those only (e.g. an expensive row).
    seeds: list[int] = field(default_factory=list)
    # Bootstrap of the WER confidence intervals and paired tests (Bisani and Ney 2004,
    # asr_parallel/score/significance.py): resampled test sets, interval level, and what is resampled
    # (utterances, or whole speakers or sessions as blocks).
    bootstrap_resamples: int = 1000
    # Further paired tests besides the baseline: [reference label, run label] pairs (run labels as in the
    # table), e.g. BMUF against model averaging at the same warm-up
    pairs: list[list[str]] = field(default_factory=list)
    confidence_level: float = 0.95
    bootstrap_unit: Literal["utterance", "speaker", "session"] = "utterance"
    # Train and tabulate only these runs of ``runs`` (by label), with the pairs among them, e.g.
    # --overrides "compare.only=[tdnn_single,tdnn_gpipe]"; [] = every run. Each run trains into the
    # directory it would have in the whole list, so a later selection (or the whole list) reuses it.
    only: list[str] = field(default_factory=list)


@dataclass
class RecipeConfig:
    """The whole recipe."""

    data_dir: str = "data/chime6_sim"
    exp_dir: str = "exp/chime6_sim"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    manifests: ManifestConfig = field(default_factory=ManifestConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # The parallel-training strategy: {name: ..., its parameters}; see asr_parallel.strategies.
    strategy: dict = field(default_factory=lambda: {"name": "single"})
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    # Filled in by the loader, not by the file.
    source: str = field(default="<defaults>", metadata={"internal": True})
    strategy_params: Any = field(default=None, metadata={"internal": True}, compare=False)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("internal")}
        return json.loads(json.dumps({k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                                      for k, v in d.items()}))

    def fingerprint(self, *sections: str) -> str:
        """A short hash of the named sections (all when none are named), for stage markers."""
        d = self.to_dict()
        if sections:
            d = {s: d[s] for s in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to this file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: key 'base' expects str (a config file), got {base!r}")
        data = _deep_merge(_read_yaml(path.parent / base, seen + (path,)), data)
    return data


def split_overrides(text: str) -> list[str]:
    """Split run.sh's ``--overrides`` string into ``key=value`` items at whitespace outside brackets,
    braces and quotes, so that values may hold spaces: ``decode.lm_weights=[0.5, 1.0] train.lr=1e-3``
    gives two items. Quotes are kept (the value is read as YAML)."""
    items, cur, depth, quote = [], [], 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch.isspace() and depth <= 0:
            if cur:
                items.append("".join(cur))
                cur = []
            continue
        cur.append(ch)
    if quote or depth > 0:
        raise ConfigError(f"overrides '{text}': unbalanced {'quote' if quote else 'bracket'}")
    if cur:
        items.append("".join(cur))
    return items


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.subkey=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RecipeConfig:
    """Load and validate a recipe config, applying ``key=value`` overrides."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        data = _read_yaml(Path(path))
        source = str(path)
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{k}' is not a section")
        node[keys[-1]] = value
    if overrides:
        source += " (with overrides " + " ".join(overrides) + ")"
    cfg = _build(RecipeConfig, data, source)
    cfg.source = source
    validate(cfg)
    return cfg


def validate(cfg: RecipeConfig) -> None:
    """Checks of values beyond their types."""
    src = cfg.source
    sim = cfg.corpus.simulation

    def need(cond: bool, key: str, what: str) -> None:
        if not cond:
            raise ConfigError(f"{src}: key '{key}' {what}")

    need(sim.train_minutes_per_session > 0, "corpus.simulation.train_minutes_per_session", "must be > 0")
    need(sim.eval_minutes_per_session > 0, "corpus.simulation.eval_minutes_per_session", "must be > 0")
    need(0 <= sim.num_arrays <= 6, "corpus.simulation.num_arrays", "must be between 0 and 6")
    known_engines = {"espeak-ng", "flite", "festival"}
    need(
        bool(sim.engines) and set(sim.engines) <= known_engines,
        "corpus.simulation.engines",
        f"must be a non-empty list from {sorted(known_engines)}",
    )
    need(len(sim.rt60_range) == 2 and 0 < sim.rt60_range[0] <= sim.rt60_range[1],
         "corpus.simulation.rt60_range", "must be [low, high] seconds with 0 < low <= high")
    need(len(sim.snr_db_range) == 2 and sim.snr_db_range[0] <= sim.snr_db_range[1],
         "corpus.simulation.snr_db_range", "must be [low, high] dB with low <= high")
    need(sim.base_voice_limit == 0 or sim.base_voice_limit >= 2 * len(sim.engines),
         "corpus.simulation.base_voice_limit", "must be 0 (all) or at least 2 per engine (a male and a female)")
    need(0 <= sim.eval_oov_sentence_fraction <= 1, "corpus.simulation.eval_oov_sentence_fraction", "must be in [0, 1]")
    need(0 <= sim.overlap_probability <= 1, "corpus.simulation.overlap_probability", "must be in [0, 1]")
    need(1 <= sim.min_words <= sim.max_words, "corpus.simulation.min_words", "must be >= 1 and <= max_words")
    need(set(cfg.manifests.mics) <= {"ihm", "mdm"} and cfg.manifests.mics,
         "manifests.mics", "must be a non-empty list from ['ihm', 'mdm']")
    need(set(cfg.manifests.mdm_parts) <= {"train", "dev", "eval"}, "manifests.mdm_parts",
         "must be a list from ['train', 'dev', 'eval']")
    need(0 <= cfg.features.reference_channel <= 3, "features.reference_channel", "must be 0..3 (CH1..CH4)")
    need(cfg.features.worn_channel in (0, 1), "features.worn_channel", "must be 0 or 1")
    need(cfg.features.num_jobs >= 1, "features.num_jobs", "must be >= 1")
    need(cfg.tokenizer.vocab_size >= 10, "tokenizer.vocab_size", "must be >= 10")
    tr = cfg.train
    need(tr.world_size >= 1, "train.world_size", "must be >= 1")
    need(tr.epochs >= 1, "train.epochs", "must be >= 1")
    need(tr.max_duration > 0, "train.max_duration", "must be > 0")
    need(tr.lr > 0, "train.lr", "must be > 0")
    need(tr.checkpoint_every_steps >= 1, "train.checkpoint_every_steps", "must be >= 1")
    need(tr.max_bad_batches >= 1, "train.max_bad_batches", "must be >= 1")
    need(tr.num_workers == "auto" or tr.num_workers >= 0, "train.num_workers", "must be 'auto' or >= 0")
    need(tr.pad_growth >= 1.0, "train.pad_growth", "must be >= 1.0 (1.0: no padding beyond the longest utterance)")
    need(tr.average_last_checkpoints >= 1, "train.average_last_checkpoints", "must be >= 1")
    need(tr.nnodes >= 1, "train.nnodes", "must be >= 1")
    need(tr.world_size % tr.nnodes == 0, "train.nnodes",
         f"must divide train.world_size ({tr.world_size}) into equal numbers of ranks per node, got {tr.nnodes}")
    need(tr.node_rank < tr.nnodes, "train.node_rank", f"must be below train.nnodes ({tr.nnodes}), got {tr.node_rank}")
    need(tr.nnodes == 1 or tr.emulate_nodes <= 1, "train.nnodes",
         "real nodes (train.nnodes > 1) and emulated ones (train.emulate_nodes > 1) exclude each other")
    need(tr.rdzv_backend != "static" or tr.nnodes == 1 or tr.node_rank >= 0, "train.node_rank",
         "must be given on every node with train.rdzv_backend static")
    need(tr.rdzv_endpoint == "" or re.fullmatch(r"[^\s:]+:\d+", tr.rdzv_endpoint) is not None,
         "train.rdzv_endpoint", f"must be HOST:PORT, got '{tr.rdzv_endpoint}'")
    need(tr.max_restarts >= 0, "train.max_restarts", "must be >= 0")
    need(tr.collective_timeout > 0, "train.collective_timeout", "must be > 0 (seconds)")
    need(set(cfg.decode.methods) <= {"greedy", "wfst"} and cfg.decode.methods, "decode.methods",
         "must be a non-empty list from ['greedy', 'wfst']")
    need(bool(cfg.decode.lm_weights), "decode.lm_weights", "must list at least one weight")
    need(bool(cfg.decode.blank_penalties()), "decode.blank_penalty", "must be a number or a non-empty list")
    need(len({f"{w:g}" for w in cfg.decode.lm_weights}) == len(cfg.decode.lm_weights), "decode.lm_weights",
         f"must not repeat a value (decodings are named by it), got {cfg.decode.lm_weights}")
    need(len({f"{p:g}" for p in cfg.decode.blank_penalties()}) == len(cfg.decode.blank_penalties()),
         "decode.blank_penalty", f"must not repeat a value (decodings are named by it), got {cfg.decode.blank_penalty}")
    need(all(w > 0 for w in cfg.decode.lm_weights), "decode.lm_weights", "every weight must be > 0")
    need(cfg.decode.lm_extra_text.strip() != "", "decode.lm_extra_text",
         "must be 'auto', 'none' or a text file's path")
    need(1 <= cfg.decode.lm_order <= 5, "decode.lm_order", "must be 1..5")
    td = cfg.model.tdnn
    need(len(td.kernels) == len(td.dilations), "model.tdnn.dilations", "must have one entry per kernel")
    need(0 <= td.subsample_layer < len(td.kernels), "model.tdnn.subsample_layer", "must index a layer")
    cf = cfg.model.conformer
    if cfg.model.name == "conformer":
        need(cf.block != "rotary" or cf.conv_norm == "layer", "model.conformer.conv_norm",
             f"must be 'layer' with block 'rotary' (it normalises every frame on its own), got '{cf.conv_norm}'")
        need(cf.model_dim % cf.num_heads == 0, "model.conformer.num_heads",
             f"must divide model_dim {cf.model_dim}, got {cf.num_heads}")
        need(cf.block != "rotary" or (cf.model_dim // cf.num_heads) % 2 == 0, "model.conformer.num_heads",
             f"must split model_dim {cf.model_dim} into heads of an even size (rotary pairs channels), "
             f"got {cf.num_heads}")
        need(cf.kernel % 2 == 1, "model.conformer.kernel", f"must be odd, got {cf.kernel}")
    tc = cfg.train
    if tc.optimizer in ("adam", "adamw"):
        need(0.0 <= tc.momentum < 1.0, "train.momentum", f"is Adam's beta1 here: must be in [0, 1), got {tc.momentum}")
    else:
        need(tc.momentum >= 0.0, "train.momentum", f"must be >= 0, got {tc.momentum}")
    if tc.compile:
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        need(tc.compile_backend in backends, "train.compile_backend",
             f"must be one of torch.compile's backends ({', '.join(backends)}), got '{tc.compile_backend}'")
    rates = tc.link_rate.split(",")
    need(all(r.strip() for r in rates) and (len(rates) == 1 or len(rates) == max(1, tc.emulate_nodes)),
         "train.link_rate", f"must be one tc rate, or one per emulated node ({tc.emulate_nodes}), got '{tc.link_rate}'")
    rpn = tc.ranks_per_node
    need(all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in rpn), "train.ranks_per_node",
         f"must list whole numbers of ranks >= 1, got {rpn}")
    need(not rpn or tc.emulate_nodes > 1, "train.ranks_per_node",
         "places ranks on emulated nodes only (train.emulate_nodes > 1); real nodes run world_size / nnodes each")
    need(not rpn or (len(rpn) == tc.emulate_nodes and sum(rpn) == tc.world_size), "train.ranks_per_node",
         f"must give one count per emulated node ({tc.emulate_nodes}) adding up to train.world_size "
         f"({tc.world_size}), got {rpn}")
    need(not rpn or tc.emulate_nodes <= 9, "train.ranks_per_node",
         "works for up to 9 emulated nodes (torchrun orders the nodes by address, as text)")
    need(not (len(set(rpn)) > 1 and cfg.strategy.get("name") == "hierarchical"
              and not cfg.strategy.get("group_size")), "train.ranks_per_node",
         f"{rpn} puts unequal numbers of ranks on the nodes: strategy hierarchical then needs strategy.group_size")
    # a dumped config (JSON-safe, as dump_config writes it) holds the ranks as strings: read them back
    tc.slow_ranks = {int(k) if isinstance(k, str) and k.strip().isdigit() else k: v for k, v in tc.slow_ranks.items()}
    for rank, factor in tc.slow_ranks.items():
        need(isinstance(rank, int) and not isinstance(rank, bool) and rank >= 0, "train.slow_ranks",
             f"keys must be ranks (integers >= 0), got {rank!r}")
        need(isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor >= 1.0, "train.slow_ranks",
             f"values must be slow-down factors >= 1.0, got {factor!r} for rank {rank}")
    # The strategy section is checked against the chosen strategy's own parameters.
    from asr_parallel.strategies import parse_strategy

    try:
        cfg.strategy_params = parse_strategy(cfg.strategy)
    except ValueError as e:
        raise ConfigError(f"{src}: {e}") from None
    for i, run in enumerate(cfg.compare.runs):
        key = f"compare.runs[{i}]"
        if not isinstance(run, dict) or "strategy" not in run:
            raise ConfigError(f"{src}: key '{key}' must be a mapping with a 'strategy' section")
        unknown = sorted(set(run) - {"strategy", "world_size", "overrides", "label", "seeds"})
        if unknown:
            raise ConfigError(f"{src}: unknown key '{key}.{unknown[0]}'; valid keys here: label, overrides, "
                              "seeds, strategy, world_size")
        try:
            parse_strategy(run["strategy"])
        except ValueError as e:
            raise ConfigError(f"{src}: {key}: {e}") from None
        if not isinstance(run.get("world_size", 1), int) or run.get("world_size", 1) < 1:
            raise ConfigError(f"{src}: key '{key}.world_size' must be an integer >= 1")
        if not isinstance(run.get("overrides", []), list):
            raise ConfigError(f"{src}: key '{key}.overrides' must be a list of key=value strings")
        if "seeds" in run:
            own = run["seeds"]
            if not cfg.compare.seeds:
                raise ConfigError(f"{src}: key '{key}.seeds' needs compare.seeds (a run's seeds are a subset of them)")
            if not isinstance(own, list) or not own or not set(own) <= set(cfg.compare.seeds) \
                    or len(set(own)) != len(own):
                raise ConfigError(f"{src}: key '{key}.seeds' must be a non-empty list of distinct seeds out of "
                                  f"compare.seeds {cfg.compare.seeds}, got {own}")
    cc = cfg.compare
    repeated = sorted({s for s in cc.seeds if cc.seeds.count(s) > 1})
    need(not repeated, "compare.seeds", f"must list distinct seeds, got {cc.seeds} ({repeated} repeated)")
    need(all(s >= 0 for s in cc.seeds), "compare.seeds", f"must hold seeds >= 0, got {cc.seeds}")
    need(cc.bootstrap_resamples >= 100, "compare.bootstrap_resamples", "must be >= 100 (Bisani and Ney use 10^3-10^4)")
    need(0 < cc.confidence_level < 1, "compare.confidence_level", "must be in (0, 1), e.g. 0.95")


def dump_config(cfg: RecipeConfig, path: str | Path) -> None:
    from asr_parallel.utils.io import atomic_write_text

    atomic_write_text(path, f"# effective config, from {cfg.source}\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def add_config_args(parser) -> None:
    """The options every stage entry point shares."""
    parser.add_argument("--config", default="recipes/chime6_sim.yaml", help="recipe config (YAML)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set corpus.simulation.seed=3 (repeatable)",
    )


def main(argv=None) -> None:
    """``python -m asr_parallel.config --config FILE [--set k=v] [--get key | --dump]``: read a config
    from the shell (run.sh asks for ``train.world_size`` this way) or print the effective config."""
    import argparse
    import sys

    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--split-overrides"]:  # run.sh: one override per line, NUL-terminated
        try:
            items = split_overrides(" ".join(argv[1:]))
        except ConfigError as e:
            print(f"ERROR: {e}", file=sys.stderr)
            raise SystemExit(1)
        sys.stdout.write("".join(item + "\0" for item in items))
        return
    p = argparse.ArgumentParser(description=main.__doc__)
    add_config_args(p)
    p.add_argument("--get", default=None, help="print a dotted key's value (several, comma-separated: one per line)")
    p.add_argument("--dump", action="store_true", help="print the whole effective config as YAML")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        raise SystemExit(1)
    if args.get:
        for key in args.get.split(","):
            node: Any = cfg.to_dict()
            for k in key.split("."):
                if not isinstance(node, dict) or k not in node:
                    print(f"ERROR: {args.config}: no key '{key}'", file=sys.stderr)
                    raise SystemExit(1)
                node = node[k]
            print(node if not isinstance(node, (dict, list)) else json.dumps(node))
    else:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")


if __name__ == "__main__":
    main()
