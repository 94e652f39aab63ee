"""Pure-PyTorch TensorNet: tensor algebra, radial functions, layers and the energy model."""

from .model import TensorNet

__all__ = ["TensorNet"]
