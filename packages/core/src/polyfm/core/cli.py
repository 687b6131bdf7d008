"""The ``polyfm`` command.

``fit/validate/test/predict`` go to LightningCLI (YAML recipes); the rest are ours:
``models``, ``weights``, ``cv``, ``study``, ``demo``, ``bench``.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import lightning as L

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def polyfm_cli_class() -> type[Any]:
    """LightningCLI with polyfm's defaults: atomic checkpoint writes, weights_only reads, the default
    callbacks, ``--ckpt_path last`` found in a new process, and checkpoint lists as ensembles."""
    from lightning.pytorch.cli import LightningCLI

    from polyfm.core.trainer import AtomicCheckpointIO, check_output_dir, default_callbacks

    class PolyfmCLI(LightningCLI):
        def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
            # atomic checkpoint writes and weights_only reads for every CLI run
            config = self.config_init[self.subcommand]["trainer"] if self.subcommand else self.config_init["trainer"]
            if config.get("default_root_dir"):
                check_output_dir(config["default_root_dir"])
            plugins = list(config.get("plugins") or [])
            if not any(isinstance(p, AtomicCheckpointIO) for p in plugins):
                config["plugins"] = [*plugins, AtomicCheckpointIO()]
            # the GPU path, the utilisation monitor and the sync-light bar, unless the recipe brings its own
            callbacks = config.get("callbacks") or []
            callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
            config["callbacks"] = callbacks + default_callbacks(callbacks, config.get("enable_progress_bar") is not False)
            return super().instantiate_trainer(**kwargs)

        def _resolve_last(self) -> None:
            # Lightning finds "last" only inside the process that ran fit; in a new
            # validate/test/predict process it warns and runs the untrained model
            assert self.subcommand is not None
            if self.config_init[self.subcommand].get("ckpt_path") == "last":
                self.config_init[self.subcommand]["ckpt_path"] = str(find_last_checkpoint(self.trainer))

        def before_predict(self) -> None:
            # several checkpoints (k-fold models, seeds): predict with their average and spread
            ckpt_path = self.config_init["predict"].get("ckpt_path")
            paths = checkpoint_list(ckpt_path) if isinstance(ckpt_path, str) else []
            if len(paths) > 1:
                from polyfm.core.predict import Ensemble

                self.model = Ensemble(self.model, paths)
                self.config_init["predict"]["ckpt_path"] = None
            elif len(paths) == 1:
                self.config_init["predict"]["ckpt_path"] = paths[0]
            # a writer puts the predictions in files; Lightning would also keep every batch's output in memory
            # until the end (an hour of audio, a whole scene) for a return value the command line throws away.
            # Lightning still hands an epoch-interval writer its batches.
            from lightning.pytorch.callbacks import BasePredictionWriter

            if self.config_init["predict"].get("return_predictions") is None and any(
                isinstance(c, BasePredictionWriter) for c in getattr(self.trainer, "callbacks", [])
            ):
                self.config_init["predict"]["return_predictions"] = False
            self._resolve_last()

        before_validate = before_test = _resolve_last

    return PolyfmCLI


def run_polyfm_cli(argv: list[str], run: bool = True) -> Any:
    """Build (and with ``run``, run) the CLI on ``argv``; our errors come out as one message.
    ``run=False`` takes no subcommand: it builds the trainer, model and data module only."""
    saved_argv = sys.argv
    sys.argv = saved_argv[:1]  # the arguments travel in args=argv; both set makes LightningCLI warn on every run
    try:
        return polyfm_cli_class()(
            model_class=None,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=argv,
            run=run,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )
    except Exception as exc:
        message = polyfm_error_message(exc)
        if message is None or os.environ.get("POLYFM_TRACEBACK"):
            raise
        command = argv[0] if run else "cv"
        print(f"polyfm {command}: error: {message}\n(set POLYFM_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        sys.argv = saved_argv


def lightning_main(argv: list[str]) -> None:
    run_polyfm_cli(argv)


def checkpoint_list(ckpt_path: str) -> list[str]:
    """``--ckpt_path`` as a list: comma-separated paths and glob patterns (``folds/*/last.ckpt``,
    sorted), or the one path as given (``last`` included). A pattern that matches nothing is an error."""
    import glob

    from polyfm.core.errors import ConfigError

    paths: list[str] = []
    for part in (p.strip() for p in ckpt_path.split(",")):
        if not part:
            continue
        if glob.has_magic(part):
            matches = sorted(glob.glob(os.path.expanduser(part), recursive=True))
            if not matches:
                raise ConfigError(f"--ckpt_path {part!r} matches no file: give the .ckpt files of the fit runs (e.g. 'runs/fold*/checkpoints/last.ckpt')")
            paths.extend(matches)
        else:
            paths.append(part)
    return paths


def find_last_checkpoint(trainer: L.Trainer) -> Path:
    """``last.ckpt`` of this recipe's checkpoint folders, else the newest one under
    ``default_root_dir`` (where Lightning puts it when the callback names no folder)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from polyfm.core.errors import ConfigError

    folders = [Path(cb.dirpath) for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]  # type: ignore[attr-defined]
    for folder in folders:
        if (folder / "last.ckpt").is_file():
            return folder / "last.ckpt"
    root = Path(trainer.default_root_dir)
    found = sorted(root.rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not found:
        looked = ", ".join(str(f) for f in [*folders, root])
        raise ConfigError(
            f"--ckpt_path last: no last.ckpt in {looked}. Run `polyfm fit` with this recipe first (its ModelCheckpoint "
            "needs save_last: true), or pass the checkpoint file's path."
        )
    print(f"polyfm: --ckpt_path last -> {found[-1]}", file=sys.stderr)
    return found[-1]


def polyfm_error_message(exc: BaseException) -> str | None:
    """Our error's message when ``exc`` is one, or wraps one: jsonargparse re-raises an
    error from a class it builds as a ValueError that lists each Union member's error
    and dumps the whole config; the user needs the member's message only."""
    from polyfm.core.errors import PolyfmError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, PolyfmError):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    if "Does not validate against any of the Union subtypes" in text and "\nErrors:\n" in text:
        errors = text.split("\nErrors:\n", 1)[1].split("\nGiven value type:", 1)[0]
        kept = [line[4:] for line in errors.splitlines() if line.startswith("  - ") and not line.startswith("  - Expected a <class 'NoneType'>")]
        return "\n".join(kept) or None
    return None


def cmd_models(_: argparse.Namespace) -> None:
    for ep in sorted(entry_points(group="polyfm.models"), key=lambda e: e.name):
        models = ep.load()
        for name, cls in sorted(models.items()):
            print(f"{ep.name:<8} {name:<32} {cls.__module__}.{cls.__qualname__}")


def cmd_weights(args: argparse.Namespace) -> None:
    from polyfm.core import weights

    if args.action == "list":
        for spec in sorted(weights.list_weights(), key=lambda s: s.name):
            print(f"{spec.name:<40} {spec.family:<24} {spec.license:<16} {', '.join(spec.files)}")
    elif args.action == "fetch":
        for name in args.names:
            print(weights.fetch_weights(name))
    elif args.action == "verify":
        for name in args.names:
            spec = weights.get_weights(name)
            folder = weights.weights_dir(spec)
            for filename, (_, sha) in spec.files.items():
                weights.verify_file(folder / filename, sha)
                print(f"ok  {folder / filename}")
    elif args.action == "convert":
        spec = weights.get_weights(args.names[0])
        state = weights.unwrap_state_dict(weights.load_checkpoint_file(args.source))
        converted = spec.converter(state) if spec.converter else state
        print(weights.save_safetensors(converted, args.output, metadata={"polyfm_weights": spec.name}))


def cmd_study(args: argparse.Namespace) -> None:
    from polyfm.core.studies import run_study

    run_study(Path(args.config), workers=args.workers, ray_address=args.ray_address, output=args.output)


def cmd_cv(args: argparse.Namespace) -> None:
    from polyfm.core.crossval import run_cross_validation

    run_cross_validation(args.config, args.lightning_args, num_folds=args.num_folds, folds=args.folds, output=args.output, test=args.test)


def cmd_demo(args: argparse.Namespace) -> None:
    from polyfm.core.demo import run_demo

    run_demo(output=Path(args.output), data_dir=args.data_dir, domains=args.domains, quick=args.quick, seeds=tuple(args.seeds))


def cmd_bench(args: argparse.Namespace) -> None:
    from polyfm.core.bench import run_all

    run_all(Path(args.output), quick=not args.full, only=args.domains, device=args.device, repeats=args.repeats, finetune_steps=args.finetune_steps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polyfm", description="Domain foundation models: pretrain, fine-tune, transfer studies.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, help=f"LightningCLI {name} with a YAML recipe (--config recipe.yaml)", add_help=False)
    sub.add_parser("models", help="list the models of installed packages").set_defaults(func=cmd_models)
    w = sub.add_parser("weights", help="list, fetch, verify or convert official checkpoints")
    w.add_argument("action", choices=["list", "fetch", "verify", "convert"])
    w.add_argument("names", nargs="*")
    w.add_argument("--source", help="convert: the official checkpoint file")
    w.add_argument("--output", help="convert: the safetensors file to write")
    w.set_defaults(func=cmd_weights)
    s = sub.add_parser("study", help="run a transfer study grid")
    s.add_argument("action", choices=["run"])
    s.add_argument("config")
    s.add_argument("--workers", type=int, default=1, help="local processes (one per GPU when GPUs are present)")
    s.add_argument("--ray-address", default=None, help="run trials on a Ray cluster (ray.init(address=...))")
    s.add_argument("--output", default=None, help="results folder (default: the study's own)")
    s.set_defaults(func=cmd_study)
    c = sub.add_parser("cv", help="k-fold cross-validation of a recipe: fit each fold, metrics mean ± std, fold ensemble")
    c.add_argument("--config", action="append", default=[], help="the recipe (repeat to layer overrides)")
    c.add_argument("--num-folds", type=int, default=None, help="K: folds 0 .. K-1, passed as --data.num_folds")
    c.add_argument("--folds", type=int, nargs="+", default=None, help="the folds to run (default 0 .. K-1; ESC-50: 1 2 3 4 5)")
    c.add_argument("--output", default="runs/cv", help="one sub-folder per fold, cv.json with the summary")
    c.add_argument("--test", action="store_true", help="also run the test split with each fold's model")
    c.set_defaults(func=cmd_cv)
    d = sub.add_parser("demo", help="pretrain, fine-tune and compare with scratch in every installed domain")
    d.add_argument("--output", default="reports/demo")
    d.add_argument("--data-dir", default=None, help="real data folder (default: $POLYFM_DATA_DIR, else built-in samples)")
    d.add_argument("--domains", nargs="*", default=None)
    d.add_argument("--quick", action="store_true", help="smallest settings (used by the tests)")
    d.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per configuration (mean and std in the report)")
    d.set_defaults(func=cmd_demo)
    b = sub.add_parser("bench", help="throughput and memory vs the reference implementations")
    b.add_argument("--output", default="reports/bench.json")
    b.add_argument("--domains", nargs="*", default=None)
    b.add_argument("--device", default=None)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--full", action="store_true", help="full-size configurations (default: quick)")
    b.add_argument("--finetune-steps", type=int, default=30, help="steps of each domain's fine-tuning loop under the utilisation monitor (0: skip)")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        lightning_main(argv)
        return
    parser = build_parser()
    if argv and argv[0] == "cv":  # the arguments cv does not know go on to each fold's LightningCLI
        args, rest = parser.parse_known_args(argv)
        args.lightning_args = rest
    else:
        args = parser.parse_args(argv)
    from polyfm.core.errors import PolyfmError

    try:
        args.func(args)
    except (PolyfmError, KeyError) as exc:  # our errors already say what to do: no traceback
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"polyfm {args.command}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
