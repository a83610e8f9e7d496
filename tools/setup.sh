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
# Pinned together first, so that no later resolution pulls another torch.
"${pip[@]}" install "torch==2.11.0" "torchaudio==2.11.0"
"${pip[@]}" install -e ".[test]"
"$venv/bin/python" -c 'import torch, torchaudio, lhotse, sentencepiece, kaldifst, kaldi_decoder, kaldilm, kaldialign, pyroomacoustics, soundfile' \
  || { echo "setup: the installed packages do not import; see the error above" >&2; exit 1; }
echo "$want" > "$stamp"
echo "setup: environment ready in $venv"
