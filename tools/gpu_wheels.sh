#!/usr/bin/env bash
# Download, on this machine, the wheels that tools/gpu_check.sh installs on a lent GPU machine
# (python 3.12 there; it has torch, torchaudio, tensorboard, sentencepiece but not these). Writes .whl/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  lhotse==1.33.0 lilcom==1.8.2 kaldifst==1.8.3 kaldi-decoder==0.3.2 kaldilm==1.15.5 kaldialign==0.12.0 \
  kaldingram==0.1.2 soundfile==0.14.0 audioread==3.1.0 cytoolz==1.2.0 intervaltree==3.2.1 cffi pycparser \
  pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pygments==2.21.0
ls .whl
