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
    print(f"  cutoff: {model.cutoff_upper} A")
    print(f"  elements: {model.metadata.get('elements', 'not recorded (any Z below max_z)')}")
    if "level_of_theory" in model.metadata:
        print(f"  level_of_theory: {model.metadata['level_of_theory']}")
    validation = model.metadata.get("validation")
    if isinstance(validation, dict):  # errors on held-out data, one per line, 4 digits
        print("  validation:")
        for key, value in validation.items():
            shown = f"{value:.4g}" if isinstance(value, float) else value
            print(f"    {key}: {shown}")
    elif validation is not None:
        print(f"  validation: {validation}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .checkpoints import load_model
    from .export import TensorNetForce, export, validate_elements
    from .nn.tables import requested_tolerance

    model = load_model(args.model, trust_pickle=args.trust_pickle)
    try:
        numbers = [int(v) for v in args.atomic_numbers.split(",")]
    except ValueError:
        raise ValueError(
            f"--atomic-numbers {args.atomic_numbers!r}: give the ML atoms' atomic numbers as "
            "integers separated by commas, in the order of their positions (water: 8,1,1)"
        ) from None
    validate_elements(model, numbers)
    module = TensorNetForce(model, numbers, periodic=args.periodic,
                            total_charge=args.total_charge,
                            low_memory=args.low_memory,
                            fused_kernels=args.fused_kernels,
                            radial_tables=requested_tolerance(args.radial_tables))  # fmt: skip
    export(module, args.output)
    print(f"wrote {args.output}: {len(numbers)} atoms, periodic={args.periodic}; forward(positions "
          "nm[, box nm]) -> energy kJ/mol")  # fmt: skip
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .allocator import keep_freed_memory
    from .runner import RunError, load_config, parse_override, run

    keep_freed_memory()
    overrides = [parse_override(text) for text in args.set]
    for key, value in (("production_steps", args.steps), ("output", args.output),
                       ("platform", args.platform), ("model", args.model)):  # fmt: skip
        if value is not None:
            overrides.append({key: value})
    if args.no_progress:
        overrides.append({"progress": False})
    config = load_config(args.config, overrides)
    try:
        run(config, resume=args.resume)
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
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


def _cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from .allocator import keep_freed_memory
    from .training import TrainConfig, train

    keep_freed_memory()
    config = TrainConfig.from_yaml(args.config)
    overrides = {k: v for k, v in (("epochs", args.epochs), ("output", args.output),
                                   ("device", args.device), ("max_minutes", args.max_minutes),
                                   ("init_from", args.init_from)) if v is not None}  # fmt: skip
    config = dataclasses.replace(config, **overrides)
    config.validate()
    train(config)
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
    fit = sub.add_parser("train", help="fit a TensorNet to energies and forces (YAML config)")
    fit.add_argument("config", help="training configuration (YAML; see tensornet_openmm.training)")
    fit.add_argument("--epochs", type=int, help="override the number of epochs")
    fit.add_argument("--output", help="override the output folder")
    fit.add_argument("--device", help="override the device (auto, cpu, cuda)")
    fit.add_argument("--max-minutes", type=float, help="stop after this much wall-clock time")
    fit.add_argument("--init-from", help="start from this model (fine-tuning)")
    fit.set_defaults(func=_cmd_train)
    runner = sub.add_parser("run", help="run MD from a YAML configuration (see simulations/)")
    runner.add_argument("config", help="run configuration (YAML; see tensornet_openmm.runner)")
    runner.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a configuration value, e.g. --set ml.atoms=all")  # fmt: skip
    runner.add_argument("--steps", type=int, help="production steps")
    runner.add_argument("--output", help="output folder")
    runner.add_argument("--platform", help="OpenMM platform (auto, CUDA, CPU, Reference)")
    runner.add_argument("--model", help="model name or file")
    runner.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    runner.add_argument("--no-progress", action="store_true", help="no progress bar")
    runner.set_defaults(func=_cmd_run)
    exporter = sub.add_parser("export", help="write a standalone TorchScript file for OpenMM")
    exporter.add_argument("model", help="model name or file")
    exporter.add_argument("-o", "--output", required=True, help="output .pt file")
    exporter.add_argument("--atomic-numbers", required=True,
                          help="comma-separated atomic numbers of the ML atoms")  # fmt: skip
    exporter.add_argument("--periodic", action="store_true", help="the module takes a box")
    exporter.add_argument("--total-charge", type=float, default=0.0)
    exporter.add_argument("--trust-pickle", action="store_true")
    exporter.add_argument("--low-memory", action="store_true",
                          help="forces without the pairs' activations")  # fmt: skip
    exporter.add_argument("--fused-kernels", action="store_true",
                          help="compiled kernels for the pair geometry, sums and algebra: "
                          "faster on the CPU and, where built with CUDA, on GPUs; loading the "
                          "file then needs tensornet_openmm")  # fmt: skip
    exporter.add_argument("--radial-tables", nargs="?", const=True, default=False, type=float,
                          metavar="TOLERANCE",
                          help="read the radial networks from tables (faster, approximate: "
                          "relative error 1e-6, or TOLERANCE)")  # fmt: skip
    exporter.set_defaults(func=_cmd_export)
    selftest = sub.add_parser("selftest", help="check that the model and the OpenMM stack work")
    selftest.set_defaults(func=_cmd_selftest)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["run"]:  # the process's own command line
        from .openmp import restart_with_short_spin

        restart_with_short_spin("tensornet_openmm.cli", sys.argv[1:])  # MM after ML on the CPU
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
