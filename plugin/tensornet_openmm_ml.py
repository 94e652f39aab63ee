"""openmm-ml adapter: ``MLPotential("tensornet", modelPath=...)`` backed by tensornet_openmm.

Installed as its own small distribution (``pip install ./plugin``) so that the core package never
depends on openmm-ml, and openmm-ml only discovers ``tensornet`` where the adapter (and therefore
openmm-ml) is actually installed. Everything is delegated to :func:`tensornet_openmm.create_force`.

    from openmmml import MLPotential
    potential = MLPotential("tensornet", modelPath="ala2-water-gfn2")  # a name or a file
    system = potential.createSystem(topology)  # or createMixedSystem(topology, mm, atoms, ...)
"""

from __future__ import annotations

import openmm
from openmmml.mlpotential import MLPotentialImpl, MLPotentialImplFactory

FORCE_NAME = "TensorNet (openmm-ml)"
INTERPOLATION_HELP = (
    "openmm-ml's generic embeddings interpolate by copying the TensorNet TorchForce into a "
    "CustomCVForce. OpenMM copies CustomCVForce contents through its XML deserializer, and the "
    "TorchForce deserializer of the PyPI openmm-torch 1.5 wheel crashes (segmentation fault) "
    "with torch 2.9; a CustomCVForce also disables CUDA graphs. Use "
    "createMixedSystem(..., interpolate=True, embedding='tensornet'): the same "
    "E = lambda ML + (1 - lambda) MM with the TorchForce outside any CustomCVForce."
)


def _refuse_deepcopy_of_our_force(original):
    def deepcopy(self, memo):
        if self.getName() == FORCE_NAME:
            raise ValueError(INTERPOLATION_HELP)
        return original(self, memo)

    deepcopy.tensornet_guard = True
    return deepcopy


if not getattr(openmm.Force.__deepcopy__, "tensornet_guard", False):
    # copying goes through the crashing deserializer: a clear error instead of a segfault
    openmm.Force.__deepcopy__ = _refuse_deepcopy_of_our_force(openmm.Force.__deepcopy__)

# createSystem / addForces keywords: ours, and the ones openmm-ml's embeddings pass along
FORCE_OPTIONS = {
    "totalCharge": "total_charge",
    "cudaGraphs": "cuda_graphs",
    "positions": "positions",
    "capacityMargin": "capacity_margin",
    "outputsForces": "outputs_forces",
    "lowMemory": "low_memory",
    "fusedKernels": "fused_kernels",
    "radialTables": "radial_tables",
}
OPENMMML_PASSED = {"mlLongRange", "linkAtomDistances", "device"}


class TensorNetPotentialImplFactory(MLPotentialImplFactory):
    """Creates :class:`TensorNetPotentialImpl` objects for openmm-ml."""

    def createImpl(self, name: str, modelPath=None, trustPickle: bool = False, **unknown):
        if unknown:
            raise ValueError(
                f"MLPotential('{name}') got unknown argument(s) {sorted(unknown)}; it accepts "
                "modelPath (a tensornet_openmm model file, a TorchMD-Net checkpoint or a shipped "
                "model name) and trustPickle"
            )
        if modelPath is None:
            raise ValueError(
                f"MLPotential('{name}') needs modelPath=: a model file or a shipped model name "
                "such as 'ala2-water-gfn2'"
            )
        return TensorNetPotentialImpl(modelPath, trustPickle)


class TensorNetPotentialImpl(MLPotentialImpl):
    """Adds a tensornet_openmm TorchForce for the requested atoms."""

    def __init__(self, model_path, trust_pickle: bool = False) -> None:
        from tensornet_openmm import load_model

        self.model = load_model(model_path, trust_pickle=trust_pickle)

    def getMLLongRange(self) -> bool:
        return False  # TensorNet is local: interactions end at the model's cutoff

    def getSupportedEmbeddings(self) -> list[str]:
        return ["tensornet"]

    def createMixedSystem(self, topology, system, atoms, forceGroup, interpolate, embedding,
                          returnInfo=False, **args):  # fmt: skip
        """The ``tensornet`` embedding: :func:`tensornet_openmm.create_mixed_system`.

        openmm-ml itself removes ML-ML constraints afterwards (its ``removeConstraints``) and
        wraps the System when ``returnInfo`` is requested.
        """
        from tensornet_openmm import create_mixed_system

        unknown = sorted(set(args) - set(FORCE_OPTIONS) - {"allowCutBonds"})
        if unknown:
            raise ValueError(f"the tensornet embedding got unknown argument(s) {unknown}")
        options = {FORCE_OPTIONS[k]: v for k, v in args.items() if k in FORCE_OPTIONS}
        return create_mixed_system(
            topology, system, list(atoms), self.model, interpolate=interpolate,
            remove_constraints=False, allow_cut_bonds=args.get("allowCutBonds", False),
            force_group=forceGroup, **options,
        )  # fmt: skip

    def addForces(self, topology, system, atoms, forceGroup, **args):
        from tensornet_openmm import create_force

        unknown = sorted(set(args) - set(FORCE_OPTIONS) - OPENMMML_PASSED)
        if unknown:
            raise ValueError(
                f"the tensornet potential got unknown argument(s) {unknown}; it accepts "
                f"{sorted(FORCE_OPTIONS)}"
            )
        options = {FORCE_OPTIONS[k]: v for k, v in args.items() if k in FORCE_OPTIONS}
        all_atoms = list(topology.atoms())
        indices = list(range(len(all_atoms))) if atoms is None else list(atoms)
        numbers = []
        for i in indices:
            if all_atoms[i].element is None:
                raise ValueError(f"atom {i} ({all_atoms[i].name}) has no element")
            numbers.append(all_atoms[i].element.atomic_number)
        periodic = topology.getPeriodicBoxVectors() is not None
        box = None
        if periodic:
            box = topology.getPeriodicBoxVectors()
        force = create_force(
            self.model, numbers, None if atoms is None else indices, periodic,
            force_group=forceGroup, box_vectors=box, name=FORCE_NAME, **options,
        )  # fmt: skip
        system.addForce(force)
