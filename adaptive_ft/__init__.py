"""adaptive-ft: decide from real usage what to fine-tune, fine-tune exactly that, ship it quantized, prove it helped."""

import os as _os
from typing import MutableMapping as _MutableMapping

from adaptive_ft import console as _console

__version__ = "0.1.0"

_console.install()  # before anything imports bitsandbytes (see adaptive_ft/console.py)

OPENMP_SPIN = 10_000_000  # GOMP_SPINCOUNT: busy-wait iterations (a fraction of a second) before an idle thread sleeps


def spin_openmp_threads(environ: _MutableMapping[str, str] = _os.environ) -> bool:
    """Let torch's OpenMP threads wait for the next op by spinning for a fraction of a second, then sleep.

    A LoRA training step on a CPU is thousands of short ops, each an OpenMP parallel region. Between two
    regions libgomp's idle threads (torch's CPU builds use libgomp) sleep on a futex almost at once here,
    and waking them costs tens of microseconds per op, a share of a step that grows as the matmuls get
    faster (bf16). ``GOMP_SPINCOUNT`` keeps them busy-waiting long enough to bridge every gap within a
    step, and still lets them sleep when the process stops computing (checkpoints, other stages), unlike
    ``OMP_WAIT_POLICY=ACTIVE``. libgomp reads it once, when torch is first imported: call this before that
    (the CLI does, at its import). Left alone when the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``
    (e.g. ``OMP_WAIT_POLICY=PASSIVE`` where other jobs need the cores). Returns whether it set it.
    """
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return False
    environ["GOMP_SPINCOUNT"] = str(OPENMP_SPIN)
    return True
