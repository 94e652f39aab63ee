"""tensornet_openmm: TensorNet potentials for OpenMM.

The model (:class:`TensorNet`, :func:`load_model`, :func:`save_model`) imports neither OpenMM nor
openmm-torch; the OpenMM-facing helpers are imported on first use.
"""

from .nn import TensorNet

__version__ = "0.1.0"
__all__ = ["TensorNet", "__version__"]

from .checkpoints import load_model, save_model  # noqa: E402

__all__ += ["load_model", "save_model"]

_LAZY = {  # need OpenMM: imported on first use
    "create_force": "forces",
    "create_ml_system": "systems",
    "create_mixed_system": "systems",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ += list(_LAZY)
