"""The OpenMP spin setting: ``tensornet-openmm run`` restarts itself once with a short spin."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tensornet_openmm import openmp

ROOT = Path(__file__).resolve().parents[1]


def test_tuned_environment_keeps_the_users_value():
    assert openmp.tuned_environment({"PATH": "/bin"}) == {
        "PATH": "/bin", openmp.VARIABLE: str(openmp.SPIN_COUNT)
    }  # fmt: skip
    assert openmp.tuned_environment({openmp.VARIABLE: "50000"})[openmp.VARIABLE] == "50000"


def _run_log(tmp_path, name, extra_env):
    env = {k: v for k, v in os.environ.items() if k != openmp.VARIABLE}
    env.update(extra_env)
    out = tmp_path / name
    # the console script's call: main() with the process's own command line
    code = "import sys; from tensornet_openmm.cli import main; sys.exit(main())"
    argv = [sys.executable, "-c", code, "run", str(ROOT / "simulations" / "ala2-vacuum.yaml"),
            "--steps", "2", "--output", str(out), "--platform", "CPU", "--no-progress",
            "--set", "equilibration_steps=0", "--set", "minimize.max_iterations=1",
            "--set", "report_interval=1"]  # fmt: skip
    # (the timeout only guards against a hang: a loaded or slow machine takes minutes)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr
    return (out / "run.log").read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libgomp and exec: Linux")
def test_run_restarts_with_short_spin_and_keeps_a_given_one(tmp_path):
    pytest.importorskip("openmm")
    if not openmp._libgomp_loaded():
        pytest.skip("torch does not run on libgomp here")
    log = _run_log(tmp_path, "tuned", {})
    assert f"OpenMP spin count {openmp.SPIN_COUNT})" in log
    log = _run_log(tmp_path, "given", {openmp.VARIABLE: "12345"})
    assert "OpenMP spin count 12345)" in log
