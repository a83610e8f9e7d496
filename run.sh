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

help_message="Usage: ./run.sh [options]

Stages:
  0  corpus      generate the simulated CHiME-6 corpus under data/ (or check --corpus-dir)
  1  manifests   lhotse manifests and supervision cuts per split and microphone
  2  features    80-dim log-mel filterbanks (lilcom) for worn and array microphones
  3  tokenizer   sentencepiece BPE, tokens.txt, words.txt, lexicon.txt
  4  graph       word n-gram LM from the training transcripts, TLG decoding graph
  5  train       acoustic model with the configured strategy (torchrun when train.world_size > 1)
  6  decode      greedy and WFST decoding of dev and eval, worn and array microphones
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
for kv in $overrides; do cfg_args+=(--set "$kv"); done
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

# Training: one process, or torchrun with train.world_size ranks (gloo on CPU, NCCL on GPU).
train() {
  local world_size nodes rate
  world_size=$("$python" -m asr_parallel.config "${cfg_args[@]}" --get train.world_size)
  nodes=$("$python" -m asr_parallel.config "${cfg_args[@]}" --get train.emulate_nodes)
  if [ "$nodes" -gt 1 ] && [ "$(id -u)" != 0 ]; then
    log "WARNING: train.emulate_nodes=$nodes needs root (network namespaces, tc); training on one node instead"
    nodes=1
  fi
  if [ "$nodes" -gt 1 ]; then
    if [ $((world_size % nodes)) -ne 0 ]; then
      log "ERROR: stage 5 (train): train.world_size $world_size is not a multiple of train.emulate_nodes $nodes"
      return 1
    fi
    rate=$("$python" -m asr_parallel.config "${cfg_args[@]}" --get train.link_rate)
    local per_node=$((world_size / nodes)) args
    args=$(printf ' %q' "${cfg_args[@]}")
    # One thread per rank: every emulated node shares this machine's cores.
    local/emulate_cluster.sh --nodes "$nodes" --rate "$rate" -- env ASR_PARALLEL_THREADS=$(( $(nproc) / world_size > 0 ? $(nproc) / world_size : 1 )) \
      bash -c ".venv/bin/torchrun --nnodes $nodes --nproc-per-node $per_node --rdzv-backend c10d \
        --rdzv-endpoint \$MASTER_ADDR:29400 --rdzv-conf is_host=\$([ \$NODE_RANK = 0 ] && echo true || echo false) \
        --local-addr \$NODE_ADDR --rdzv-id asr-parallel -m asr_parallel.bin.train$args"
  elif [ "$world_size" -gt 1 ]; then
    .venv/bin/torchrun --standalone --nproc-per-node "$world_size" -m asr_parallel.bin.train "${cfg_args[@]}"
  else
    "$python" -m asr_parallel.bin.train "${cfg_args[@]}"
  fi
}
run_stage 5 train     train
run_stage 6 decode    "$python" -m asr_parallel.bin.decode "${cfg_args[@]}"
run_stage 7 score     "$python" -m asr_parallel.bin.score "${cfg_args[@]}"
run_stage 8 compare   "$python" -m asr_parallel.bin.compare "${cfg_args[@]}"
log "run.sh: stages $stage..$stop_stage finished"
exit
}
