"""OpenMM forces from TorchScript modules. The ONLY module that imports openmmtorch.

OpenMM and openmm-torch are imported lazily, so ``import tensornet_openmm`` works without them.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch

_INSTALL_HINT = (
    "openmm-torch is needed to put a TorchScript model into OpenMM: "
    "pip install openmmtorch==1.5 openmm==8.6.1 torch==2.9.1 (these three versions together)"
)


def _openmmtorch():
    try:
        import openmmtorch
    except ImportError as err:  # pragma: no cover - exercised only without openmmtorch
        raise ImportError(f"{_INSTALL_HINT} ({err})") from err
    return openmmtorch


def make_torch_force(
    module: torch.jit.ScriptModule | torch.nn.Module,
    periodic: bool = False,
    outputs_forces: bool = False,
    cuda_graphs: bool = True,
    cuda_graph_warmup_steps: int = 10,
    force_group: int = 0,
    global_parameters: Sequence[tuple[str, float]] = (),
):
    """Wrap a module with OpenMM's calling convention in an ``openmmtorch.TorchForce``.

    Parameters
    ----------
    module : ScriptModule or nn.Module
        forward(positions (n, 3) nm [, box (3, 3) nm] [, one scalar tensor per global
        parameter]) -> energy kJ/mol, or (energy, forces kJ/mol/nm) when ``outputs_forces``.
        An ``nn.Module`` is scripted first.
    periodic : bool
        Pass the box to the module (``setUsesPeriodicBoundaryConditions``).
    outputs_forces : bool
        The module returns forces itself (``setOutputsForces``).
    cuda_graphs : bool
        Capture the module in a CUDA graph on the CUDA platform (property ``useCUDAGraphs``).
    cuda_graph_warmup_steps : int
        Eager steps before capture (property ``CUDAGraphWarmupSteps``).
    force_group : int
        OpenMM force group, 0 to 31.
    global_parameters : sequence of (name, default)
        Context parameters handed to the module, in this order.
    """
    if not 0 <= force_group <= 31:
        raise ValueError(f"force_group={force_group} must be between 0 and 31")
    if cuda_graph_warmup_steps < 1:
        raise ValueError(f"cuda_graph_warmup_steps={cuda_graph_warmup_steps} must be >= 1")
    if not isinstance(module, torch.jit.ScriptModule):
        module = torch.jit.script(module)
    openmmtorch = _openmmtorch()
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    properties = {
        "useCUDAGraphs": "true" if cuda_graphs else "false",
        "CUDAGraphWarmupSteps": str(int(cuda_graph_warmup_steps)),
    }
    force = openmmtorch.TorchForce(torch.jit.load(io.BytesIO(buffer.getvalue())), properties)
    force.setUsesPeriodicBoundaryConditions(bool(periodic))
    force.setOutputsForces(bool(outputs_forces))
    force.setForceGroup(int(force_group))
    for name, default in global_parameters:
        force.addGlobalParameter(str(name), float(default))
    return force
