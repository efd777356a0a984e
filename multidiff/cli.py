"""The ``multidiff`` command.

::

    multidiff list                                  modalities, processes, solvers, grids, checkpoints
    multidiff train MODALITY [--config F] [--section.field VALUE ...]
    multidiff sample CHECKPOINT -n N [--solver S] [--nfe K] [--out DIR] [--picture]
    multidiff evaluate CHECKPOINT -n N [--solver S] [--nfe K]
    multidiff likelihood CHECKPOINT [-n N] [--split holdout]
    multidiff info CHECKPOINT
    multidiff demo
    multidiff MODALITY VERB ...                     verbs a modality adds

``CHECKPOINT`` is a checkpoint directory, a run directory (its newest valid checkpoint) or the
name of a shipped checkpoint (``digits``). Exit codes: 0 success, 1 a failure the message
explains (bad checkpoint, bad data, bad config value), 2 a usage error.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .prediction import PREDICTIONS
from .process import PROCESSES
from .samplers import SOLVERS
from .schedules import GRIDS


class CLIError(Exception):
    """A failure to report in one line with exit code 1."""


def _pipeline(args):
    from .pipeline import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(args.checkpoint, device=args.device)


def _generator(args):
    import torch

    return torch.Generator(device=args.device).manual_seed(args.seed)


def _sample_options(args) -> dict:
    opts = {"solver": args.solver, "nfe": args.nfe, "grid": args.grid, "guidance": args.guidance,
            "batch_size": args.batch_size, "progress": True}
    if args.labels is not None:
        opts["labels"] = args.labels
    return opts


def _labels_for(args, n: int):
    """``--labels all`` cycles through every class; numbers are taken as given."""
    if args.labels == ["all"]:
        return "all"
    return [int(v) for v in args.labels] if args.labels is not None else None


# -- commands ------------------------------------------------------------------------------
def cmd_list(args) -> int:
    from .registry import ModalityError, available_modalities, get_modality

    print("modalities:  " + (", ".join(available_modalities()) or "none"))
    print("processes:   " + ", ".join(sorted(PROCESSES)))
    print("predictions: " + ", ".join(PREDICTIONS))
    print("solvers:     " + ", ".join(sorted(SOLVERS)))
    print("time grids:  " + ", ".join(sorted(GRIDS)))
    shipped = []
    for name in available_modalities():
        try:
            shipped += [f"{name}/{ck}" for ck in get_modality(name).pretrained()]
        except ModalityError as err:
            print(f"warning: {err}", file=sys.stderr)
    print("checkpoints: " + (", ".join(shipped) or "none"))
    return 0


def cmd_train(args, overrides: list[str]) -> int:
    from .pipeline import train
    from .registry import get_modality
    from .training.config import apply_overrides, load_config

    modality = get_modality(args.modality)
    config = modality.default_config()
    if args.config:
        config = load_config(args.config, base=config)
    if args.out:
        overrides = [f"--run.out_dir={args.out}", *overrides]
    if args.steps:
        overrides = [f"--run.steps={args.steps}", *overrides]
    config = apply_overrides(config, overrides)
    result = train(modality, config)
    print(json.dumps({"step": result.step, "loss": result.loss, "checkpoint": str(result.checkpoint)}))
    return 0


def _resolve_labels(pipe, args, n):
    labels = _labels_for(args, n)
    if labels == "all":
        k = pipe.modality.num_classes(pipe.config)
        if not k:
            raise CLIError("--labels all needs a class-conditional model")
        labels = [i % k for i in range(n)]
    return labels


def cmd_sample(args) -> int:
    """Samples in seeded chunks (see DiffusionPipeline.generate): the same files for a seed
    whether run as one process or sharded over a ``torchrun`` launch."""
    from .training.distributed import destroy_distributed, init_distributed

    info = init_distributed()
    try:
        pipe = _pipeline(args)
        opts = _sample_options(args)
        opts.pop("progress")
        opts["progress"] = info.is_main
        if args.labels is not None:
            opts["labels"] = "all" if args.labels == ["all"] else [int(v) for v in args.labels]
        objects = pipe.generate(args.n, args.seed, Path(args.out) / "shards", chunk_size=args.chunk_size, **opts)
        if objects is not None:
            paths = pipe.save(objects, args.out, picture=args.picture)
            print(f"wrote {len(paths)} files to {args.out}")
    finally:
        destroy_distributed()
    return 0


def cmd_evaluate(args) -> int:
    pipe = _pipeline(args)
    opts = _sample_options(args)
    labels = _resolve_labels(pipe, args, args.n)
    if labels is not None:
        opts["labels"] = labels
    else:
        opts.pop("labels", None)
    objects = pipe.sample(args.n, generator=_generator(args), **opts)
    metrics = pipe.evaluate(objects, labels=labels)
    print(json.dumps({"solver": args.solver, "nfe": args.nfe, "n": args.n, **metrics}, indent=2))
    return 0


def cmd_likelihood(args) -> int:
    from .likelihood import dataset_likelihood

    pipe = _pipeline(args)
    result = dataset_likelihood(pipe, split=args.split, n=args.n, generator=_generator(args),
                                rtol=args.rtol, atol=args.rtol)
    print(json.dumps(result, indent=2))
    return 0


def cmd_info(args) -> int:
    print(json.dumps(_pipeline(args).info(), indent=2))
    return 0


def cmd_demo(args) -> int:
    from . import demo

    demo.main(["--out", str(args.out), "-n", str(args.n)])
    return 0


# -- parser --------------------------------------------------------------------------------
def _add_checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint or run directory, or a shipped checkpoint name (e.g. digits)")
    p.add_argument("--device", default="cpu", help="device to run on (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _add_sampling(p: argparse.ArgumentParser, n_default: int) -> None:
    p.add_argument("-n", type=int, default=n_default, help=f"number of samples (default {n_default})")
    p.add_argument("--solver", default="dpmpp_2m", choices=sorted(SOLVERS), metavar="SOLVER",
                   help="solver (default dpmpp_2m): " + ", ".join(sorted(SOLVERS)))
    p.add_argument("--nfe", type=int, default=20, help="network evaluations per sample (default 20)")
    p.add_argument("--grid", default=None, choices=sorted(GRIDS), help="time grid (default: the solver's)")
    p.add_argument("--labels", nargs="+", default=None,
                   help="class labels (one, one per sample, or 'all' to cycle through the classes)")
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance scale w (0: none)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per batch (default: all at once)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="multidiff", description="Multi-modal diffusion toolkit.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("list", help="list modalities, processes, predictions, solvers, grids and shipped checkpoints")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("train", help="train a modality; extra --section.field VALUE flags override the config",
                       epilog="example: multidiff train images --run.steps 2000 --optim.lr 5e-4 --out runs/digits")
    p.add_argument("modality", help="a modality name (see `multidiff list`)")
    p.add_argument("--config", help="a JSON or YAML config file merged over the modality's defaults")
    p.add_argument("--out", help="run directory (same as --run.out_dir)")
    p.add_argument("--steps", type=int, help="optimiser steps (same as --run.steps)")
    p.set_defaults(func=cmd_train, takes_overrides=True)

    p = sub.add_parser("sample", help="sample a checkpoint and write the outputs")
    _add_checkpoint(p)
    _add_sampling(p, 16)
    p.add_argument("--out", default="out/samples", help="output folder (default out/samples)")
    p.add_argument("--picture", action="store_true", help="also write a picture of the samples")
    p.add_argument("--chunk-size", type=int, default=64,
                   help="samples per seeded chunk (default 64); results depend on seed and chunk size only")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="sample a checkpoint and print its quality figures as JSON")
    _add_checkpoint(p)
    _add_sampling(p, 500)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("likelihood", help="exact negative log-likelihood (bits/dim) of held-out data")
    _add_checkpoint(p)
    p.add_argument("-n", type=int, default=200, help="number of data items (default 200)")
    p.add_argument("--split", default="holdout", help="data split (default holdout)")
    p.add_argument("--rtol", type=float, default=1e-4, help="ODE solver tolerance (default 1e-4)")
    p.set_defaults(func=cmd_likelihood)

    p = sub.add_parser("info", help="describe a checkpoint")
    _add_checkpoint(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="sample an analytic 2-D target with several solvers and write a picture")
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("-n", type=int, default=2000, help="samples per solver")
    p.set_defaults(func=cmd_demo)

    _add_modality_commands(sub)
    return ap


def _add_modality_commands(sub) -> None:
    from .registry import ModalityError, available_modalities, get_modality

    for name in available_modalities():
        try:
            modality = get_modality(name)
        except ModalityError:
            continue
        before = len(sub.choices)
        p = sub.add_parser(name, help=f"{name} commands")
        verbs = p.add_subparsers(dest="verb", metavar="VERB")
        modality.add_commands(verbs)
        if not verbs.choices:  # the modality adds no verbs: do not advertise an empty command
            sub._name_parser_map.pop(name, None)
            sub._choices_actions = sub._choices_actions[:before]


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, extra = ap.parse_known_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    if extra and not getattr(args, "takes_overrides", False):
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    from .registry import ModalityError
    from .training.checkpoint import CheckpointError
    from .training.config import ConfigError

    try:
        if getattr(args, "takes_overrides", False):
            return args.func(args, extra)
        return args.func(args)
    except (CLIError, CheckpointError, ConfigError, ModalityError, ValueError, FileNotFoundError, ImportError) as err:
        print(f"multidiff: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("multidiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

