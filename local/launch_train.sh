#!/usr/bin/env bash
# Stage 5's launcher: starts the training ranks for every case (one process, torchrun on one node,
# torchrun on several nodes with a c10d or static rendezvous, SLURM, the emulated cluster) and
# prints the exact command it runs. Options and cases: local/launch_train.sh --help
# (asr_parallel/bin/launch.py).
#   local/launch_train.sh --config recipes/chime6_sim.yaml --set train.world_size=2
#   local/launch_train.sh --config ... --set train.world_size=4 --nnodes 2 --rdzv-endpoint node0:29400
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${ASR_PARALLEL_PYTHON:-.venv/bin/python}
exec "$python" -m asr_parallel.bin.launch "$@"
