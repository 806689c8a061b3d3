"""adaptive_ft.spin_openmp_threads: torch's OpenMP threads spin between ops unless the user chose otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import adaptive_ft

ROOT = Path(__file__).resolve().parents[1]


def test_spin_count_is_set_only_where_the_user_chose_no_wait_policy() -> None:
    env: dict[str, str] = {}
    assert adaptive_ft.spin_openmp_threads(env) is True
    assert env == {"GOMP_SPINCOUNT": str(adaptive_ft.OPENMP_SPIN)} and adaptive_ft.OPENMP_SPIN > 0
    for chosen in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "0"}):
        env = dict(chosen)
        assert adaptive_ft.spin_openmp_threads(env) is False and env == chosen  # the user's choice stands


def test_the_cli_sets_it_before_torch_is_loaded() -> None:
    """libgomp reads GOMP_SPINCOUNT once, when torch loads it: the CLI's import must set it and load no torch."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    code = ("import os, sys; import adaptive_ft.cli; "
            "print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(adaptive_ft.OPENMP_SPIN), "False"]
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "False"]
