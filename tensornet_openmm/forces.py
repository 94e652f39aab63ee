"""OpenMM forces from TorchScript modules. The ONLY module that imports openmmtorch.

OpenMM and openmm-torch are imported lazily, so ``import tensornet_openmm`` works without them.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

_INSTALL_HINT = (
    "openmm-torch is needed to put a TorchScript model into OpenMM: "
    "pip install openmmtorch==1.5 openmm==8.6.1 torch==2.9.1 (these three versions together)"
)


def _openmmtorch():
    try:
        # openmmtorch imports the deprecated simtk.openmm shim, which prints a warning
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
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
    from .export import inline_forward

    if not isinstance(module, torch.jit.ScriptModule):
        module = torch.jit.script(module)
    openmmtorch = _openmmtorch()
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    properties = {
        "useCUDAGraphs": "true" if cuda_graphs else "false",
        "CUDAGraphWarmupSteps": str(int(cuda_graph_warmup_steps)),
    }
    # (inlined, so that an error inside reaches OpenMM as an exception: export.inline_forward)
    loaded = inline_forward(torch.jit.load(io.BytesIO(buffer.getvalue())))
    force = openmmtorch.TorchForce(loaded, properties)
    force.setUsesPeriodicBoundaryConditions(bool(periodic))
    force.setOutputsForces(bool(outputs_forces))
    force.setForceGroup(int(force_group))
    for name, default in global_parameters:
        force.addGlobalParameter(str(name), float(default))
    return force


def fixed_pair_lists(system, platform: str = "CUDA") -> list:
    """The TensorNet modules in ``system``'s TorchForces that run a pair list of fixed capacity
    on ``platform`` (a platform name): on CUDA those made with a capacity (``create_force`` gives
    one with CUDA graphs), elsewhere only modules made with ``fixed_on_cpu``. Such a list can
    overflow; each item is the TorchScript module, and
    :func:`tensornet_openmm.export.pair_list_fill` says how full it is."""
    openmmtorch = _openmmtorch()
    found = []
    for force in system.getForces():
        if not openmmtorch.TorchForce.isinstance(force):
            continue
        force = openmmtorch.TorchForce.cast(force)
        module = force.getModule()
        inner = module.inner if hasattr(module, "inner") else module
        if int(getattr(inner, "capacity", -1)) < 0:
            continue  # not ours, or a dynamic pair list
        if platform == "CUDA" or bool(getattr(inner, "fixed_on_cpu", False)):
            found.append(module)
    return found


def _nm_array(values, name: str) -> np.ndarray:
    """An (n, 3) float64 array in nm from an OpenMM Quantity or a plain array (nm)."""
    import openmm.unit as u

    if hasattr(values, "value_in_unit"):
        values = values.value_in_unit(u.nanometer)
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiu":
        array = values.astype(np.float64)  # no loop over the rows: 600,000 atoms took 2 s
    else:
        rows = [
            row.value_in_unit(u.nanometer) if hasattr(row, "value_in_unit") else row
            for row in values
        ]
        array = np.asarray([[float(c) for c in row] for row in rows], dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 3:
        raise ValueError(f"{name} must have shape (n, 3) in nm; got {array.shape}")
    if not np.isfinite(array).all():
        rows = np.flatnonzero(~np.isfinite(array).all(axis=1))
        raise ValueError(f"{name} are not all finite numbers: rows {rows[:10].tolist()}")
    return array


GRAPHS_BELOW_ATOMS = 1000
"""``cuda_graphs=None`` (the default) captures CUDA graphs for ML regions of fewer atoms than
this and runs larger ones eagerly. Measured on an H200 (``benchmarks/results/``): with graphs
alanine dipeptide took 1.22 ms/step against 8.80 without, but the step grew by about 9 us per ML
atom, so a 1,443-atom water box took 13.88 against 9.45 ms and a 4,866-atom one 45.2 against
16.5; the lines cross near 900 atoms. Without graphs the pair list is also exact and dynamic,
with no capacity to outgrow."""


def uses_cuda_graphs(cuda_graphs: bool | None, n_ml: int) -> bool:
    """What ``cuda_graphs`` means for an ML region of ``n_ml`` atoms: True or False as given,
    None by size (:data:`GRAPHS_BELOW_ATOMS`)."""
    if cuda_graphs is None:
        return n_ml < GRAPHS_BELOW_ATOMS
    if not isinstance(cuda_graphs, (bool, np.bool_)):
        raise ValueError(
            f"cuda_graphs={cuda_graphs!r} must be True, False or None (by the ML region's size: "
            f"graphs below {GRAPHS_BELOW_ATOMS} atoms)"
        )
    return bool(cuda_graphs)


def create_force(
    model,
    atomic_numbers: Sequence[int],
    atoms: Sequence[int] | None = None,
    periodic: bool = False,
    total_charge: float = 0.0,
    cuda_graphs: bool | None = None,
    force_group: int = 0,
    *,
    positions=None,
    box_vectors=None,
    capacity: int | None = None,
    capacity_margin: float = 1.5,
    strategy: str = "auto",
    outputs_forces: bool | None = None,
    cuda_graph_warmup_steps: int = 10,
    lambda_parameter: str | None = None,
    name: str = "TensorNet",
    low_memory: bool = False,
    fused_kernels: bool | None = None,
    radial_tables: bool | float = False,
):
    """An ``openmmtorch.TorchForce`` evaluating a TensorNet on some or all particles of a System.

    Parameters
    ----------
    model : TensorNet, str or Path
        The model, or a checkpoint path for :func:`tensornet_openmm.load_model`.
    atomic_numbers : sequence of int
        One per ML atom (in the order of ``atoms``).
    atoms : sequence of int, optional
        Particle indices of the ML atoms (default: every particle, ``len(atomic_numbers)`` of them).
    periodic : bool
        Use the System's periodic box (minimum image within the ML region).
    total_charge : float
        Total charge of the ML region, in e.
    cuda_graphs : bool, optional
        Capture in a CUDA graph on the CUDA platform. The pair list then has a fixed capacity;
        without graphs it is dynamic (exact, no capacity to exceed). Default (None): graphs for
        ML regions of fewer than :data:`GRAPHS_BELOW_ATOMS` (1,000) atoms, where they are
        faster; larger ones run eagerly.
    force_group : int
        OpenMM force group, 0 to 31.
    positions : Quantity or (n_particles, 3) array in nm, optional
        Positions of all particles, to size the pair capacity (recommended with CUDA graphs;
        required for large systems, which use the cell list).
    box_vectors : Quantity or (3, 3) array in nm, optional
        The periodic box, checked against the model's cutoff now (and again every step).
    capacity : int, optional
        Pair slots; default: sized from ``positions`` with ``capacity_margin``.
    capacity_margin : float
        Slots per pair found at ``positions`` (and per atom in the fullest cell).
    strategy : str
        Pair search: "auto", "brute" or "cell".
    outputs_forces : bool, optional
        Compute forces inside the module (``setOutputsForces``). Under CUDA graphs the module's
        graph then ends with the forces themselves, where openmm-torch's own backward adds
        three kernels a step (accumulating into, copying and zeroing the positions' gradient).
        False: openmm-torch differentiates the energy. Default (None): True, except with a
        ``lambda_parameter``, whose energy derivative openmm-torch takes from its own backward.
    cuda_graph_warmup_steps : int
        Eager steps before capture.
    lambda_parameter : str, optional
        Name of a global parameter that scales the energy (default value 1), with its energy
        derivative enabled, e.g. for ML/MM interpolation.
    name : str
        The force's name in the System.
    low_memory : bool
        Compute forces without keeping the pairs' activations for the backward pass: the same
        forces with far less memory (with the fused kernels about 40 KB per atom of water at 128
        channels, against 450 KB) and one more pass over the pairs' networks. For the largest
        systems (see README, "Memory").
    fused_kernels : bool, optional
        Compiled kernels for the pair geometry, the pair sums and the per-atom algebra
        (:mod:`tensornet_openmm.nn.kernels`; built once, about 30 s, a minute more with CUDA):
        the same forces, faster on the CPU platform and, where the machine has a CUDA device and
        ``nvcc``, on the CUDA platform. Default: on, unless ``TENSORNET_OPENMM_FUSED=0``. Where
        they cannot be built, PyTorch runs them, with a warning.
    radial_tables : bool or float
        Read each pair's radial functions (the embedding's distance projection and every
        layer's filter network) from tables instead of running their networks
        (:mod:`tensornet_openmm.nn.tables`): a quarter less time per force call of a small
        molecule on the CPU and more than half less for water boxes, but no longer the
        reference's arithmetic to the last digit. True tabulates to a relative error of 1e-6 in
        values and derivatives (forces then differ from the exact model's by less than float32
        rounding moves them); a number sets that tolerance. With the fused kernels, PyTorch and
        ``low_memory`` alike. Default: off, the networks run exactly.

    Returns
    -------
    openmmtorch.TorchForce

    Notes
    -----
    With a fixed capacity, an overflow makes the energy and forces NaN, so the step fails
    loudly; rebuild the force from current positions and restart (see
    :mod:`tensornet_openmm.export`).
    """
    from .checkpoints import load_model
    from .export import (
        TensorNetForce,
        check_periodic_box,
        pair_capacity,
        script,
        validate_elements,
    )
    from .nn import TensorNet, kernels, tables

    if not isinstance(model, TensorNet):
        model = load_model(model)
    if strategy not in ("auto", "brute", "cell"):
        raise ValueError(
            f"strategy {strategy!r} cannot run inside OpenMM; choose 'auto', 'brute' or 'cell'"
        )
    validate_elements(model, atomic_numbers)
    if outputs_forces is None:
        outputs_forces = lambda_parameter is None
    n_ml = len(atomic_numbers)
    box = None
    if box_vectors is not None:
        box = _nm_array(box_vectors, "box_vectors")
        if periodic:
            check_periodic_box(model, box)
    ml_positions = None
    if positions is not None:
        all_positions = _nm_array(positions, "positions")
        index = np.arange(n_ml) if atoms is None else np.asarray(list(atoms), dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(all_positions)):
            raise ValueError(
                f"ML atom indices span {index.min()}..{index.max()} but positions has "
                f"{len(all_positions)} particles"
            )
        ml_positions = all_positions[index] * 10.0  # Angstrom
    cell_capacity = -1
    cuda_graphs = uses_cuda_graphs(cuda_graphs, n_ml)
    if not cuda_graphs:
        capacity = -1
    else:
        sized, cell_capacity, strategy = pair_capacity(
            model, n_ml, ml_positions, None if (box is None or not periodic) else box * 10.0,
            capacity_margin, strategy,
        )  # fmt: skip
        capacity = sized if capacity is None else int(capacity)
    module = TensorNetForce(
        model, atomic_numbers, atoms, periodic, total_charge, capacity, strategy, cell_capacity,
        outputs_forces, scale_parameter=lambda_parameter is not None, low_memory=low_memory,
        fused_kernels=kernels.wanted() if fused_kernels is None else bool(fused_kernels),
        radial_tables=tables.requested_tolerance(radial_tables),
    )  # fmt: skip
    parameters = [] if lambda_parameter is None else [(lambda_parameter, 1.0)]
    force = make_torch_force(
        script(module), periodic, outputs_forces, cuda_graphs, cuda_graph_warmup_steps,
        force_group, parameters,
    )  # fmt: skip
    if lambda_parameter is not None:
        force.addEnergyParameterDerivative(lambda_parameter)
    force.setName(name)
    return force


def save_system(system, path) -> None:
    """Write ``system`` as OpenMM XML (through a temporary file and a rename).

    The file is standard ``XmlSerializer`` output, plus the names of the TorchForces (which
    openmm-torch does not record); read it back with :func:`load_system`.
    """
    import xml.etree.ElementTree as ET

    import openmm

    root = ET.fromstring(openmm.XmlSerializer.serialize(system))
    for index, node in enumerate(root.find("Forces") or []):
        if node.get("type") == "TorchForce":
            node.set("name", system.getForce(index).getName())
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text('<?xml version="1.0" ?>\n' + ET.tostring(root, encoding="unicode"))
    tmp.replace(path)


def load_system(source):
    """Read an OpenMM System XML (a path or the XML text), TorchForces included.

    The XML is OpenMM's own format, but the TorchForces in it are rebuilt here, in Python, from
    their stored module, properties, global parameters and parameter derivatives: the C++
    deserializer of the PyPI openmm-torch 1.5 wheel crashes against torch 2.9 (segmentation fault
    in ``torch::jit::load``). Force order and indices are preserved.
    """
    import copy
    import xml.etree.ElementTree as ET

    import openmm

    text = source if isinstance(source, str) and source.lstrip().startswith("<") else None
    if text is None:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"system file {str(path)!r} does not exist")
        text = path.read_text()
    root = ET.fromstring(text)
    forces = root.find("Forces")
    torch_nodes = {}
    if forces is not None:
        for index, node in enumerate(list(forces)):
            if node.get("type") == "TorchForce":
                torch_nodes[index] = node
                forces.remove(node)
    system = openmm.XmlSerializer.deserialize(ET.tostring(root, encoding="unicode"))
    if not torch_nodes:
        return system
    others = [copy.deepcopy(system.getForce(i)) for i in range(system.getNumForces())]
    for i in reversed(range(system.getNumForces())):
        system.removeForce(i)
    for index in range(len(others) + len(torch_nodes)):
        node = torch_nodes.get(index)
        system.addForce(others.pop(0) if node is None else _torch_force_from_xml(node))
    return system


def _torch_force_from_xml(node):
    encoded = node.get("encodedFileContents", "")
    if not encoded:
        raise ValueError(
            "a TorchForce in this XML has no stored module (written by an old openmm-torch that "
            f"only recorded the file name {node.get('file')!r}); rebuild the force"
        )
    try:
        contents = bytes.fromhex(encoded)
    except ValueError:
        import base64

        contents = base64.b64decode(encoded)  # openmm-torch before 1.5 used base64
    properties = {p.get("name"): p.get("value") for p in node.iterfind("Properties/Property")}
    from .export import inline_forward
    from .nn.kernels import jit_load

    # (inlined whoever wrote it, so that an error inside reaches OpenMM: export.inline_forward)
    force = _openmmtorch().TorchForce(inline_forward(jit_load(contents)), properties)
    force.setForceGroup(int(node.get("forceGroup", "0")))
    force.setUsesPeriodicBoundaryConditions(node.get("usesPeriodic", "0") == "1")
    force.setOutputsForces(node.get("outputsForces", "0") == "1")
    for p in node.iterfind("GlobalParameters/Parameter"):
        force.addGlobalParameter(p.get("name"), float(p.get("default")))
    for p in node.iterfind("ParameterDerivatives/Parameter"):
        force.addEnergyParameterDerivative(p.get("name"))
    if node.get("name"):
        force.setName(node.get("name"))
    return force
