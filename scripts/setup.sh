#!/usr/bin/env bash
# Prepares everything `make test` and `make bench` need, then prints the Python interpreter to use (stdout).
#
# - torch already imports in python3 (the GPU machines, which have no network): that environment is used as it is;
# - otherwise .venv is created with torch==2.13.0 (pinned through constraints.txt) and requirements-dev.txt;
# - the C++ extension ghostfused._C is built with --no-build-isolation.
# A second run skips every step whose inputs have not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "[setup] $*" >&2; }

if [ -x .venv/bin/python ]; then
  py=.venv/bin/python
elif python3 -c "import torch" 2>/dev/null; then
  py=$(command -v python3)
  log "using the existing environment of $py (torch $($py -c 'import torch; print(torch.__version__)'))"
else
  log "creating .venv"
  python3 -m venv .venv
  py=.venv/bin/python
fi

if [ "$py" = .venv/bin/python ]; then
  deps_stamp=.venv/.ghostfused-deps
  deps_hash=$(cat requirements-dev.txt constraints.txt | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$deps_stamp" 2>/dev/null)" != "$deps_hash" ]; then
    log "installing requirements-dev.txt (torch pinned by constraints.txt)"
    "$py" -m pip install -q --disable-pip-version-check -c constraints.txt -r requirements-dev.txt >&2
    echo "$deps_hash" > "$deps_stamp"
  fi
fi

mkdir -p build
ext_stamp=build/.ghostfused-extension
ext_hash=$( (find csrc -type f | sort | xargs cat; cat setup.py; echo "$py"; "$py" -c 'import torch; print(torch.__version__)'; \
  echo "${GHOSTFUSED_BUILD_CUDA:-}|${TORCH_CUDA_ARCH_LIST:-}|${GHOSTFUSED_CPU_ARCH:-}") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$ext_stamp" 2>/dev/null)" != "$ext_hash" ] || ! "$py" -c "import ghostfused._C" 2>/dev/null; then
  log "building the C++ extension ghostfused._C (about a minute)"
  MAX_JOBS=${MAX_JOBS:-$(nproc)} "$py" -m pip install -q --disable-pip-version-check --no-build-isolation \
    --no-deps -e . >&2
  echo "$ext_hash" > "$ext_stamp"
fi
echo "$py"
