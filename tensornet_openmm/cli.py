"""Command-line interface: ``tensornet-openmm SUBCOMMAND ...``. Parses and calls; no physics."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence


def _cmd_info(args: argparse.Namespace) -> int:
    from .checkpoints import load_model

    model = load_model(args.model, trust_pickle=args.trust_pickle)
    dtype = next(model.parameters()).dtype
    print(f"model: {args.model}")
    for key, value in model.config.to_dict().items():
        print(f"  {key}: {value}")
    print(f"  dtype: {str(dtype).replace('torch.', '')}")
    print(f"  parameters: {model.num_parameters():,}")
    return 0


def _cmd_selftest(args: argparse.Namespace) -> int:
    """Evaluate a TensorNet in PyTorch and an analytic TorchForce in OpenMM; print a report."""
    import openmm
    import torch

    from .forces import make_torch_force
    from .nn import TensorNet

    torch.manual_seed(0)
    model = TensorNet(hidden_channels=32, num_layers=2, num_rbf=16, max_z=10, dtype=torch.float64)
    z = torch.tensor([6, 1, 1, 1, 1])
    pos = torch.tensor(
        [
            [0.0, 0.0, 0.0],
            [0.63, 0.63, 0.63],
            [-0.63, -0.63, 0.63],
            [-0.63, 0.63, -0.63],
            [0.63, -0.63, -0.63],
        ],
        dtype=torch.float64,
        requires_grad=True,
    )
    pairs = torch.tensor([[i, j] for i in range(5) for j in range(5) if i != j]).T
    start = time.perf_counter()
    energy = model(z, pos, pairs)
    energy_value = float(energy.detach())
    (grad,) = torch.autograd.grad(energy.sum(), pos)
    print(
        f"TensorNet (random weights, methane): E = {energy_value:.6f} eV, "
        f"max |F| = {float(grad.abs().max()):.4f} eV/A, "
        f"net force {float(grad.sum(0).norm()):.1e} ({1e3 * (time.perf_counter() - start):.1f} ms)"
    )

    class Harmonic(torch.nn.Module):
        def forward(self, positions: torch.Tensor) -> torch.Tensor:
            return (positions * positions).sum()

    x = torch.randn(5, 3, dtype=torch.float64)
    for name in ("Reference", "CPU"):
        system = openmm.System()
        for _ in range(5):
            system.addParticle(1.0)
        system.addForce(make_torch_force(Harmonic()))
        context = openmm.Context(
            system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(name)
        )
        context.setPositions(x.numpy())
        state = context.getState(getEnergy=True, getForces=True)
        e = state.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)
        f = torch.tensor(state.getForces(asNumpy=True)._value)
        ok = abs(e - float((x * x).sum())) < 1e-4 and torch.allclose(f, -2 * x, atol=1e-4)
        print(f"OpenMM {name:9s} TorchForce E = sum|r|^2: {'ok' if ok else 'WRONG'}")
        if not ok:
            return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensornet-openmm", description="TensorNet potentials in OpenMM."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="show a model's hyperparameters and size")
    info.add_argument("model", help="model file (ours or a TorchMD-Net .ckpt)")
    info.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow loading pickle-based reference checkpoints (runs code)",
    )
    info.set_defaults(func=_cmd_info)
    selftest = sub.add_parser("selftest", help="check that the model and the OpenMM stack work")
    selftest.set_defaults(func=_cmd_selftest)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
