#!/usr/bin/env bash
# Idempotent set-up for a fresh machine that has only Python 3.11, pip and apt:
#   1. Debian packages the recipe uses (speech synthesis, text source, audio tools);
#   2. a virtual environment in the repository (.venv, ignored by git);
#   3. torch and torchaudio pinned together, then the project and its dependencies.
# Re-running is cheap: each step is skipped when what it installs is already there.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"

# The Debian packages, one per line in tools/apt-packages.txt.
mapfile -t apt_pkgs < <(grep -v '^\s*#' tools/apt-packages.txt | grep -v '^\s*$')
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: these Debian packages are missing and installing them needs root:" >&2
    echo "  sudo apt-get install -y ${missing[*]}" >&2
    echo "setup: run that, then run this command again." >&2
    exit 1
  fi
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if ! "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
  echo "setup: Python 3.11 is required ($PY is $("$PY" --version 2>&1))" >&2
  exit 1
fi
venv="$top/.venv"
stamp="$venv/.asr_parallel_installed"
# The stamp holds a hash of what was installed; a changed pyproject.toml reinstalls.
want=$(cat pyproject.toml tools/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip "setuptools<82" wheel  # torch 2.11 requires setuptools<82
# torch and torchaudio, pinned together first, so that no later resolution pulls another torch.
# PyPI's torch 2.11 for x86_64 is the CUDA build: about 5.2 GB installed (4.4 GB of it torch,
# triton and the nvidia-* libraries). pip keeps every wheel of one command until it ends, and its
# cache keeps them after, which would double that, so: no cache, and one wheel per pip command
# (measured from a fresh clone: 5.4 GB of disk at the peak, 82 s).
torch_pins=("torch==2.11.0" "torchaudio==2.11.0")
if ! "$venv/bin/python" -c 'import torch, torchaudio; assert torch.__version__.split("+")[0] == "2.11.0"' 2>/dev/null; then
  need_gb=6
  free_kb=$(df -Pk "$venv" | awk 'NR==2 {print $4}')
  if [ "$free_kb" -lt $((need_gb * 1024 * 1024)) ]; then
    echo "setup: torch 2.11 and its CUDA libraries need about $need_gb GB free where $venv lies;" \
         "only $((free_kb / 1024 / 1024)) GB is free there (df -h $venv). Free some space, then run this again." >&2
    exit 1
  fi
  plan="$venv/torch-install-plan.json"
  "${pip[@]}" install --no-cache-dir --dry-run --ignore-installed --report "$plan" "${torch_pins[@]}"
  "$venv/bin/python" -c 'import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    print(item["metadata"]["name"] + "==" + item["metadata"]["version"])' "$plan" |
    while read -r req; do "${pip[@]}" install --no-cache-dir --no-deps "$req"; done
  rm -f "$plan"
fi
"${pip[@]}" install --no-cache-dir "${torch_pins[@]}"  # everything is there: this checks the set
"${pip[@]}" install --no-cache-dir -e ".[test]"
"$venv/bin/python" -c 'import torch, torchaudio, lhotse, sentencepiece, kaldifst, kaldi_decoder, kaldilm, kaldialign, pyroomacoustics, soundfile' \
  || { echo "setup: the installed packages do not import; see the error above" >&2; exit 1; }
echo "$want" > "$stamp"
echo "setup: environment ready in $venv"
