#!/usr/bin/env bash
# GPU checks, run on a lent GPU machine through the device tool (see RESULTS.md for what it gave):
#   1. NCCL: torchrun with one rank, sync_sgd (DDP over NCCL), bf16 autocast, trainer steps;
#   2. throughput of the project's trainer against a bare PyTorch loop (bf16): conformer (torchaudio's
#      block, and the rotary block with and without torch.compile), tdnn and mlp (with and without
#      torch.compile), and the survey's 6 x 2048 MLP;
#   3. tests/test_gpu.py: training steps of every model under torch.cuda.set_sync_debug_mode("error"), and
#      the devices of CTC's lengths in the strategies with their own steps;
#   4. bench_loader: the data loader (0, 2, 4 workers) against the GPU step, when the features are carried;
# The machine has torch but not lhotse or the kaldi* packages: they travel as wheels in .whl/
# (python 3.12; tools/gpu_wheels.sh downloads them here). Results are written under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "gpu_check: wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, lhotse, kaldifst, kaldi_decoder; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

run() {  # name, then the command
  local name=$1; shift
  echo "== $name"
  timeout 240 "$@" 2>&1 | grep -v "Warning\|warnings.warn" | tee "$OUT/$name.log" | tail -4
}
big="--set train.max_duration=600 --set train.device=cuda --set train.bf16=true --steps 50 --warmup 5 --repeats 3"
run nccl_sync_sgd_conformer python3 -m torch.distributed.run --standalone --nproc-per-node 1 \
  -m asr_parallel.bin.bench_train --set strategy.name=sync_sgd $big --output "$OUT/bench_nccl_sync_sgd_conformer.json"
run bench_conformer python3 -m asr_parallel.bin.bench_train $big --output "$OUT/bench_conformer.json"
run bench_mlp python3 -m asr_parallel.bin.bench_train --set model.name=mlp $big --output "$OUT/bench_mlp.json"
run bench_tdnn python3 -m asr_parallel.bin.bench_train --set model.name=tdnn $big --output "$OUT/bench_tdnn.json"
run bench_conformer_rotary python3 -m asr_parallel.bin.bench_train --set model.conformer.block=rotary $big \
  --output "$OUT/bench_conformer_rotary.json"
run bench_conformer_rotary_compile python3 -m asr_parallel.bin.bench_train --set model.conformer.block=rotary \
  --set train.compile=true $big --output "$OUT/bench_conformer_rotary_compile.json"
run bench_tdnn_compile python3 -m asr_parallel.bin.bench_train --set model.name=tdnn --set train.compile=true $big \
  --output "$OUT/bench_tdnn_compile.json"
run bench_mlp_compile python3 -m asr_parallel.bin.bench_train --set model.name=mlp --set train.compile=true $big \
  --output "$OUT/bench_mlp_compile.json"
# the survey's MLP (6 x 2048, RESULTS' anchor): frames/s here; model FLOP utilisation is frames/s times
# 3 x the model's forward FLOPs per frame (its stage table) over the GPU's peak, worked out from the JSON
run bench_mlp_6x2048 python3 -m asr_parallel.bin.bench_train --set model.name=mlp --set model.mlp.num_layers=6 \
  --set model.mlp.hidden_dim=2048 $big --output "$OUT/bench_mlp_6x2048.json"
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
# every strategy that takes the trainer's step, on one rank under NCCL (cpu:gloo,cuda:nccl), 5 steps
small="--set train.max_duration=200 --set train.device=cuda --set train.bf16=true --steps 5 --warmup 2 --repeats 1"
for s in sync_sgd model_averaging bmuf easgd hierarchical pipelined_bp gpipe one_f_one_b synthetic_gradients; do
  run "nccl_$s" python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m asr_parallel.bin.bench_train \
    --set strategy.name=$s $small --output "$OUT/bench_nccl_$s.json"
done
echo "== done"
