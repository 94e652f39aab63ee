"""CPU speed of ML/MM: torch's OpenMP threads go to sleep soon after the model's work ends.

PyTorch's CPU wheels run their parallel loops on GNU OpenMP (libgomp), whose idle worker threads
spin for a long time (300,000 iterations by default) before they sleep. Inside an OpenMM step the
TorchForce is followed by the MM forces on the same cores, so those spinning workers take CPU time
from OpenMM's own threads. A short spin, :data:`SPIN_COUNT` iterations, keeps the workers awake
across the model's back-to-back parallel loops but lets them sleep before OpenMM's turn.

Measured on the project's 2-core machine (``benchmarks/bench_md.py --systems ala2-water --routes
ours reference --omp-spin both --rounds 2 --seconds 4``): alanine dipeptide in TIP3P water, 22 ML
atoms of 2,269, took 15.18 ms per step against 20.85 with libgomp's default (the reference route:
21.83 against 23.80); pure-ML water boxes are unchanged. Not spinning at all (``--omp-spin 0``)
is much slower: each parallel loop then waits for threads to wake. The count was 3,000 until the
fused CPU kernels cut a force call's parallel loops from 434 to 49; since then 15,000 is faster:
in interleaved runs of the same ML/MM step (two processes taking turns, 15 blocks of 250 steps
each) 4-12% per step in three comparisons, with 8,000 and 30,000 level with it and 50,000 17%
slower; ``--omp-spin 15000`` gave 11.53 ms against the reference's 23.64 (2.05x) where the
default 3,000 had given 12.02 against 23.80 (1.98x) an hour earlier.

libgomp reads ``GOMP_SPINCOUNT`` once, when it is loaded, which ``import torch`` does. So the
setting has to be in the environment before Python starts: ``tensornet-openmm run`` restarts
itself once with it (:func:`restart_with_short_spin`); in your own scripts run
``GOMP_SPINCOUNT=15000 python script.py``. A value already in the environment is always kept.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

VARIABLE = "GOMP_SPINCOUNT"
SPIN_COUNT = 15000
"""Iterations an idle libgomp worker spins before it sleeps (libgomp's default: 300,000)."""


def tuned_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``environ`` with :data:`SPIN_COUNT` set, unless it already names a spin count."""
    env = dict(environ)
    env.setdefault(VARIABLE, str(SPIN_COUNT))
    return env


def spin_setting() -> str:
    """What this process runs with, for logs: the value, or libgomp's default."""
    return os.environ.get(VARIABLE, "libgomp default")


def _libgomp_loaded() -> bool:
    try:
        with open("/proc/self/maps") as handle:
            return "libgomp" in handle.read()
    except OSError:  # not Linux
        return False


def restart_with_short_spin(module: str, args: Sequence[str]) -> None:
    """Replace this process by ``python -m module args`` with the short spin, when it helps.

    Returns without doing anything when the environment already names a spin count (the user's
    choice, or this process is the restarted one) or torch does not run on libgomp.
    """
    if VARIABLE in os.environ or not _libgomp_loaded():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *args], tuned_environment(os.environ))
