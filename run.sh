#!/usr/bin/env bash
# CHiME-6 recipe driver (Kaldi/icefall style). Each stage's work is a Python entry point with --help;
# this script only orchestrates. Every stage is idempotent: a finished stage is skipped on re-run,
# an interrupted one is redone cleanly.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
# The whole script is one block, read before it runs: editing run.sh during a run cannot derail it.
{

stage=0
stop_stage=7
config=recipes/chime6_sim.yaml   # recipe config under recipes/
corpus_dir=                      # a real CHiME-6 copy; empty = the simulated corpus
overrides=                       # config overrides, "key=value key=value"
nj=2                             # parallel jobs for corpus generation
force=false                      # redo stages even if marked done
setup=true                       # run tools/setup.sh first (idempotent)
nnodes=                          # stage 5 on real nodes: how many (train.nnodes)
node_rank=                       # this node's rank (train.node_rank; static rendezvous)
rdzv_endpoint=                   # HOST:PORT of node 0 for the rendezvous (train.rdzv_endpoint)
launcher=                        # auto | local | torchrun | slurm (train.launcher)

help_message="Usage: ./run.sh [options]

Stages:
  0  corpus      generate the simulated CHiME-6 corpus under data/ (or check --corpus-dir)
  1  manifests   lhotse manifests and supervision cuts per split and microphone
  2  features    80-dim log-mel filterbanks (lilcom) for worn and array microphones
  3  tokenizer   sentencepiece BPE, tokens.txt, words.txt, lexicon.txt
  4  graph       word n-gram LM from the training transcripts (and decode.lm_extra_text), TLG graph
  5  train       acoustic model with the configured strategy (torchrun when train.world_size > 1)
  6  decode      greedy and WFST decoding of dev and eval (WFST tuned on dev worn), worn and array
  7  score       WER by CHiME-6 rules per split, microphone, session, location; results.json
  8  compare     (not in the default range) train, decode and score every run of compare.runs and
                write a side-by-side table, TensorBoard HParams and plots under exp_dir/compare
                (exp_dir/compare_{N}nodes_{rate} with train.emulate_nodes N > 1)

Options (defaults in brackets):
  --stage N          first stage to run [$stage]
  --stop-stage M     last stage to run [$stop_stage]
  --config FILE      recipe config [$config]
  --corpus-dir DIR   a real CHiME-6 copy (audio/, transcriptions/) instead of the simulation
  --overrides STR    config overrides, e.g. \"corpus.simulation.seed=3 tokenizer.vocab_size=500\"
  --nj N             parallel jobs for corpus generation [$nj]
  --force BOOL       redo stages even when marked done [$force]
  --setup BOOL       install/check the environment first (tools/setup.sh) [$setup]
  --nnodes N         stage 5 across N real nodes: run the same command on every node (train.nnodes)
  --rdzv-endpoint H:P  node 0's address and a free port for torchrun's rendezvous (train.rdzv_endpoint)
  --node-rank R      this node's rank, needed on every node with --nnodes (train.node_rank): node 0
                     hosts the rendezvous and runs the other stages; with train.rdzv_backend static
                     it is also torchrun's node rank (c10d orders the nodes by address)
  --launcher NAME    auto | local | torchrun | slurm (train.launcher; auto uses srun in a SLURM
                     allocation of more than one node)

Stage 5 starts the ranks through local/launch_train.sh, which prints the exact command it runs.
Two run.sh on the same data or experiment directory do not run at once: the second stops with a
message naming the first (a lock, .run.lock in the directory).

Every stage entry point has its own --help, e.g. .venv/bin/python local/prepare_corpus.py --help"

. tools/parse_options.sh

log() {
  echo "$(date '+%Y-%m-%d %H:%M:%S') (run.sh:${BASH_LINENO[0]}) $*"
}

if [ "$setup" = true ]; then
  tools/setup.sh
fi
python=.venv/bin/python
[ -x "$python" ] || { echo "run.sh: $python missing; run tools/setup.sh (or drop --setup false)" >&2; exit 1; }

cfg_args=(--config "$config")
# Overrides split at spaces outside brackets and quotes: "decode.lm_weights=[0.5, 1.0] train.lr=1e-3"
kvs=()
if [ -n "$overrides" ]; then
  split=$(mktemp)
  "$python" -m asr_parallel.config --split-overrides "$overrides" > "$split" || { rm -f "$split"; exit 1; }
  mapfile -d '' kvs < "$split"
  rm -f "$split"
fi
[ -n "$nnodes" ] && kvs+=("train.nnodes=$nnodes")
[ -n "$node_rank" ] && kvs+=("train.node_rank=$node_rank")
[ -n "$rdzv_endpoint" ] && kvs+=("train.rdzv_endpoint=$rdzv_endpoint")
[ -n "$launcher" ] && kvs+=("train.launcher=$launcher")
for kv in "${kvs[@]}"; do cfg_args+=(--set "$kv"); done
# The config is read once here, so a bad key or value stops run.sh before any stage.
cfg_values=$("$python" -m asr_parallel.config "${cfg_args[@]}" --get exp_dir,data_dir,train.nnodes,train.node_rank) || exit 1
{ read -r exp_dir_cfg; read -r data_dir; read -r cfg_nnodes; read -r cfg_node_rank; } <<< "$cfg_values"

# lock DIR MODE: hold DIR/.run.lock (MODE exclusive, or shared for readers) while this script runs;
# another run.sh that needs it otherwise stops with a message naming the holder. A run.sh started by
# one that holds the lock (stage 8 runs stages 5-7 per run) shares it.
lock() {
  local dir=$1 mode=$2 fd abs rc=0
  mkdir -p "$dir"
  abs=$(realpath "$dir")
  [[ ":${ASR_PARALLEL_LOCKS:-}:" == *":$abs:"* ]] && return 0
  exec {fd}>>"$dir/.run.lock"
  flock -n -E 75 "$([ "$mode" = shared ] && echo -s || echo -x)" "$fd" || rc=$?
  if [ $rc = 75 ]; then
    echo "run.sh: ERROR: another run.sh is using $dir ($(cat "$dir/.run.lock.owner" 2>/dev/null || echo 'one or more that only read it, stages 5-8'));" \
      "wait for it to finish, or use another directory" >&2
    exit 1
  elif [ $rc != 0 ]; then
    echo "run.sh: ERROR: cannot lock $dir/.run.lock (flock exit status $rc; a file system without locks?)" >&2
    exit 1
  fi
  if [ "$mode" != shared ]; then
    echo "PID $$ on $(hostname), stages $stage..$stop_stage, since $(date '+%Y-%m-%d %H:%M:%S')" > "$dir/.run.lock.owner"
    owner_files+=("$dir/.run.lock.owner")
  fi
  export ASR_PARALLEL_LOCKS="${ASR_PARALLEL_LOCKS:-}:$abs"
}
# the owner notes of the exclusive locks this script holds, removed when it ends
owner_files=()
trap 'for f in "${owner_files[@]}"; do grep -qs "^PID $$ " "$f" && rm -f "$f"; done' EXIT
command -v flock >/dev/null || { echo "run.sh: 'flock' not found (Debian package util-linux)" >&2; exit 1; }
# Several real nodes (train.nnodes > 1): every node runs stage 5 with its --node-rank; node 0 alone
# takes the locks and runs the other stages (the experiment directory is shared between the nodes).
if [ "$cfg_nnodes" -gt 1 ]; then
  if [ "$cfg_node_rank" -lt 0 ]; then
    echo "run.sh: ERROR: train.nnodes is $cfg_nnodes: give every node its --node-rank (0 on the node whose address is the rendezvous endpoint)" >&2
    exit 1
  fi
  if [ "$cfg_node_rank" -gt 0 ]; then
    if [ "$stage" != 5 ] || [ "$stop_stage" != 5 ]; then
      echo "run.sh: ERROR: node $cfg_node_rank of $cfg_nnodes runs stage 5 only (--stage 5 --stop-stage 5); node 0 runs the other stages" >&2
      exit 1
    fi
  fi
fi
if [ "$cfg_nnodes" -le 1 ] || [ "$cfg_node_rank" = 0 ]; then
  if [ "$stage" -le 4 ] && [ "$stop_stage" -ge 0 ]; then
    lock "$data_dir" exclusive      # stages 0-4 write the data directory
  elif [ "$stop_stage" -ge 5 ]; then
    lock "$data_dir" shared         # later stages only read it (stage 8 may build a graph, under its own lock)
  fi
  if [ "$stop_stage" -ge 5 ]; then
    lock "$exp_dir_cfg" exclusive
  fi
fi
common=("${cfg_args[@]}")
[ -n "$corpus_dir" ] && common+=(--corpus-dir "$corpus_dir")
[ "$force" = true ] && common+=(--force)

# run_stage N NAME COMMAND...: runs COMMAND when N is within [stage, stop_stage].
run_stage() {
  local n=$1 name=$2; shift 2
  if [ "$stage" -le "$n" ] && [ "$stop_stage" -ge "$n" ]; then
    log "Stage $n ($name): start"
    local t0=$SECONDS rc=0
    "$@" || rc=$?
    if [ $rc -ne 0 ]; then
      log "Stage $n ($name): FAILED (exit status $rc); the cause is printed above"
      exit $rc
    fi
    log "Stage $n ($name): done in $((SECONDS - t0)) s"
  fi
}

run_stage 0 corpus    "$python" local/prepare_corpus.py "${common[@]}" --num-jobs "$nj"
run_stage 1 manifests "$python" local/prepare_manifests.py "${common[@]}"
run_stage 2 features  "$python" -m asr_parallel.bin.compute_fbank "${common[@]}"
run_stage 3 tokenizer "$python" -m asr_parallel.bin.train_bpe "${common[@]}"
run_stage 4 graph     "$python" -m asr_parallel.bin.prepare_graph "${common[@]}"

# Training: one process, torchrun on this node, on several nodes, SLURM, or the emulated cluster
# (local/launch_train.sh prints the command it runs).
run_stage 5 train     local/launch_train.sh "${cfg_args[@]}"
run_stage 6 decode    "$python" -m asr_parallel.bin.decode "${cfg_args[@]}"
run_stage 7 score     "$python" -m asr_parallel.bin.score "${cfg_args[@]}"
run_stage 8 compare   "$python" -m asr_parallel.bin.compare "${cfg_args[@]}"
log "run.sh: stages $stage..$stop_stage finished"
exit
}
