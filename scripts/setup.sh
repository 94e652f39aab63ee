#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install the package.
#
#   bash scripts/setup.sh           runtime: torch, openmm, openmmtorch, openmmtools, mdtraj
#   bash scripts/setup.sh --test    plus pytest, ruff, torchmd-net (test oracle), torch-cluster
#
# Idempotent: a stamp file records what was installed, so a second run with unchanged
# pyproject.toml returns in well under a second. Set TENSORNET_OPENMM_VENV to use another place.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${TENSORNET_OPENMM_VENV:-.venv}"
python="${PYTHON:-python3}"
mode=runtime
if [ "${1:-}" = "--test" ]; then mode=test; fi

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.tensornet-openmm-$mode"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

pip() { "$py" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip wheel setuptools
# torch first: openmmtorch and torch-cluster are built against exactly this release.
pip install "torch==2.9.1"
if [ "$mode" = test ]; then
    pip install -e ".[test]"
    # the openmm-ml adapter (plugin/, its own distribution; tensornet-openmm is already here)
    pip install --no-deps -e plugin
    # torch-cluster has no wheel on PyPI; it compiles against the installed torch
    # (about 7 minutes the first time; pip caches the wheel afterwards).
    pip install --no-build-isolation "torch-cluster==1.6.3"
else
    pip install -e .
fi
echo "$want" > "$stamp"
