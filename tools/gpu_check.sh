#!/usr/bin/env bash
# GPU checks, run on a lent GPU machine through the device tool (see RESULTS.md for what it gave).
# "bench", in order of what issue 15 needs first:
#   1. the project's trainer against a bare PyTorch loop (bf16): the default conformer (rotary block),
#      tdnn and mlp, each with and without torch.compile (repeats' spread in the JSON: within 3%?);
#   2. the survey's 6 x 2048 MLP: model FLOP utilisation against the datasheet's peak and a measured matmul;
#   3. the conformer in float32 with TF32 matmuls (train.tf32) against its bf16 run; torchaudio's block;
#   4. NCCL: torchrun with one rank, sync_sgd (DDP over NCCL), bf16 autocast;
#   5. tests/test_gpu.py: training steps of every model under torch.cuda.set_sync_debug_mode("error"), and
#      the devices of CTC's lengths in the strategies with their own steps;
#   6. bench_loader: the data loader (0, 2, 4 workers) against the GPU step, when the features are carried.
# "strategies": the strategies with the trainer's step or their own on GPU tensors: one rank under NCCL
#   (the data-parallel ones and the pipelines), and two ranks sharing the GPU through gloo
#   (train.dist_backend=gloo; NCCL refuses two ranks on one GPU): synchronous SGD with and without
#   compression (model averaging, BMUF and EASGD use the same collectives), and the pipelines. Not
#   the asynchronous strategies: the parameter server and DC-ASGD on GPU ranks are in tests/test_gpu.py
#   (step 5 of "bench"), Hogwild refuses GPU ranks, AD-PSGD is untested there.
# Usage: tools/gpu_check.sh [all|bench|strategies] (default all). Device time is short (15 minutes a
# session, start-up included): run "bench" first with BUDGET=420, then "strategies" with what is left;
# a check that would start past BUDGET seconds is skipped and says so.
# The machine has torch but not lhotse or the kaldi* packages: they travel as wheels in .whl/
# (python 3.12; tools/gpu_wheels.sh downloads them here; .whl/ is ignored by git, so name it in the
# device tool's carry). Results are written under $OUT.
set -uo pipefail
PART=${1:-all}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "gpu_check: wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, lhotse, kaldifst, kaldi_decoder; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

# Each check runs at most LIMIT seconds (240; the strategies' 90), and none starts once BUDGET
# seconds (default 540, inside the device tool's 600 per call) have passed since the script began.
BUDGET=${BUDGET:-540}
START=$SECONDS
LIMIT=240
run() {  # name, then the command
  local name=$1; shift
  if [ $((SECONDS - START)) -ge "$BUDGET" ]; then echo "== $name skipped: past ${BUDGET}s"; return; fi
  echo "== $name ($((SECONDS - START))s)"
  timeout "$LIMIT" "$@" 2>&1 | grep -v "Warning\|warnings.warn" | tee "$OUT/$name.log" | tail -4
}
if [ "$PART" = all ] || [ "$PART" = bench ]; then
big="--set train.max_duration=600 --set train.device=cuda --set train.bf16=true --steps 50 --warmup 5 --repeats 3"
# in order of what the issue needs first: the trainer against the bare loop in bf16 for the default
# conformer (the rotary block), TDNN and MLP, with and without torch.compile
run bench_conformer python3 -m asr_parallel.bin.bench_train $big --output "$OUT/bench_conformer.json"
run bench_tdnn python3 -m asr_parallel.bin.bench_train --set model.name=tdnn $big --output "$OUT/bench_tdnn.json"
run bench_mlp python3 -m asr_parallel.bin.bench_train --set model.name=mlp $big --output "$OUT/bench_mlp.json"
run bench_conformer_compile python3 -m asr_parallel.bin.bench_train --set train.compile=true $big \
  --output "$OUT/bench_conformer_compile.json"
run bench_tdnn_compile python3 -m asr_parallel.bin.bench_train --set model.name=tdnn --set train.compile=true $big \
  --output "$OUT/bench_tdnn_compile.json"
run bench_mlp_compile python3 -m asr_parallel.bin.bench_train --set model.name=mlp --set train.compile=true $big \
  --output "$OUT/bench_mlp_compile.json"
# the survey's MLP (6 x 2048, RESULTS' anchor): frames/s and model FLOP utilisation (3 x its forward
# FLOPs per frame x frames/s, over the datasheet's dense bf16 peak and over a measured bf16 matmul)
run bench_mlp_6x2048 python3 -m asr_parallel.bin.bench_train --set model.name=mlp --set model.mlp.num_layers=6 \
  --set model.mlp.hidden_dim=2048 $big --measure-peak --output "$OUT/bench_mlp_6x2048.json"
# the conformer in float32 with TF32 matmuls, against its bf16 run above; torchaudio's block (an option)
run bench_conformer_tf32 python3 -m asr_parallel.bin.bench_train $big --set train.bf16=false --set train.tf32=true \
  --output "$OUT/bench_conformer_tf32.json"
run bench_conformer_torchaudio python3 -m asr_parallel.bin.bench_train --set model.conformer.block=torchaudio $big \
  --output "$OUT/bench_conformer_torchaudio.json"
# one rank under NCCL through torchrun (DDP), bf16
run nccl_sync_sgd_conformer python3 -m torch.distributed.run --standalone --nproc-per-node 1 \
  -m asr_parallel.bin.bench_train --set strategy.name=sync_sgd $big --output "$OUT/bench_nccl_sync_sgd_conformer.json"
run test_gpu python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
# the loader against the GPU step: needs the recipe's training features, carried with the run
# (carry: data/chime6_sim/fbank/feats_ihm_train, data/chime6_sim/fbank/chime6-ihm_cuts_train.jsonl.gz,
# data/chime6_sim/lang_bpe_100/bpe.model: about 51 MB)
if [ -f data/chime6_sim/fbank/chime6-ihm_cuts_train.jsonl.gz ]; then
  run bench_loader python3 -m asr_parallel.bin.bench_loader --set train.device=cuda --set train.bf16=true \
    --workers 0,2,4 --batches 24 --output "$OUT/bench_loader.json"
else
  echo "== bench_loader skipped: the recipe's features were not carried"
fi
fi
if [ "$PART" = all ] || [ "$PART" = strategies ]; then
LIMIT=90
# every strategy that takes the trainer's step, on one rank under NCCL (cpu:gloo,cuda:nccl), 5 steps
small="--set train.max_duration=200 --set train.device=cuda --set train.bf16=true --steps 5 --warmup 2 --repeats 1 \
  --set train.collective_timeout=60"
for s in sync_sgd model_averaging bmuf easgd hierarchical pipelined_bp gpipe one_f_one_b synthetic_gradients; do
  run "nccl_$s" python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m asr_parallel.bin.bench_train \
    --set strategy.name=$s $small --output "$OUT/bench_nccl_$s.json"
done
# two ranks on the one GPU through gloo: synchronous SGD (DDP; model averaging, BMUF and EASGD use
# the same all-reduce and broadcast), its compressed schemes (all-gather, all-to-all) and the
# pipelines (whose messages then travel through host copies), 3 steps each
two="--set train.world_size=2 --set train.dist_backend=gloo --set train.max_duration=100 --set train.device=cuda \
  --set train.bf16=true --steps 3 --warmup 1 --repeats 1 --set train.collective_timeout=60"
for s in sync_sgd pipelined_bp gpipe one_f_one_b synthetic_gradients sync_sgd:onebit sync_sgd:powersgd; do
  name=${s%%:*}; scheme=${s#*:}; extra=""; label=$name
  if [ "$scheme" != "$s" ]; then extra="--set strategy.compression=$scheme"; label=${name}_$scheme; fi
  run "gloo2_$label" python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m asr_parallel.bin.bench_train \
    --set strategy.name=$name $extra $two --output "$OUT/bench_gloo2_$label.json"
done
fi
echo "== done"
