"""``polyfm cv``: k-fold cross-validation of any recipe whose data module takes ``fold``.

    polyfm cv --config recipe.yaml --num-folds 5 --output runs/cv [--test] [--trainer.max_epochs 20 ...]
    polyfm cv --config finetune-esc50.yaml --folds 1 2 3 4 5     # a dataset's own fold numbers

Each fold runs ``fit`` with ``--data.fold k`` (and ``--data.num_folds K``), then ``validate`` (and
with ``--test``, ``test``) on the best checkpoint of a monitored ``ModelCheckpoint``, else on the
final weights. A fold's checkpoints go to ``<output>/fold<k>/checkpoints`` whatever the recipe
says, so folds never overwrite each other; its metrics to ``<output>/fold<k>/result.json``,
written atomically. A rerun skips finished folds and resumes a killed fold from its
``last.ckpt``, so a killed cross-validation loses at most the steps since that checkpoint.
``<output>/cv.json`` holds each metric's per-fold values, mean and sample standard deviation, and
the fold checkpoints, which ``polyfm predict --ckpt_path a.ckpt,b.ckpt,...`` averages as an ensemble.
"""

from __future__ import annotations

import gc
import inspect
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from polyfm.core.errors import ConfigError
from polyfm.core.files import atomic_path


def data_module_class(configs: Sequence[str], extra_args: Sequence[str]) -> type[Any] | None:
    """The data module class the recipe names (the last config or ``--data`` argument that sets one),
    or None when it cannot be told without building everything."""
    import importlib

    class_path: str | None = None
    for config in configs:
        try:
            data = (yaml.safe_load(Path(config).read_text()) or {}).get("data")
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("class_path"), str):
            class_path = data["class_path"]
    for index, arg in enumerate(extra_args):
        if arg.startswith(("--data=", "--data.class_path=")):
            class_path = arg.split("=", 1)[1]
        elif arg in ("--data", "--data.class_path") and index + 1 < len(extra_args):
            class_path = extra_args[index + 1]
    if not class_path or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None  # LightningCLI reports it, with its own message
    return found if isinstance(found, type) else None


def check_fold_options(cls: type[Any] | None, with_num_folds: bool) -> None:
    if cls is None:
        return
    accepted = inspect.signature(cls.__init__).parameters
    needed = ["fold", "num_folds"] if with_num_folds else ["fold"]
    missing = [name for name in needed if name not in accepted]
    if missing:
        raise ConfigError(
            f"{cls.__module__}.{cls.__qualname__} takes no {' or '.join(missing)} argument, so polyfm cv cannot pick its folds. "
            "Use a data module with fold/num_folds (every domain package's file-based ones have them) or split by hand."
        )


def scalar_metrics(results: Sequence[dict[str, Any]]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for result in results:
        for key, value in result.items():
            merged[key] = float(value.item() if hasattr(value, "item") else value)
    return merged


def summarise(folds: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per stage and metric: the fold values, their mean and sample standard deviation (ddof 1; 0 for one fold)."""
    summary: dict[str, Any] = {}
    for stage in ("validate", "test"):
        names = sorted({name for result in folds.values() for name in result.get(stage, {})})
        for name in names:
            values = {k: r[stage][name] for k, r in sorted(folds.items()) if name in r.get(stage, {})}
            finite = [v for v in values.values() if math.isfinite(v)]
            mean = sum(finite) / len(finite) if finite else math.nan
            std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) if len(finite) > 1 else 0.0
            summary.setdefault(stage, {})[name] = {"mean": mean, "std": std, "folds": values}
    return summary


def run_fold(fold: int, configs: Sequence[str], extra_args: Sequence[str], num_folds: int | None, folder: Path, test: bool) -> dict[str, Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from polyfm.core.cli import run_polyfm_cli

    argv = [arg for config in configs for arg in ("--config", config)] + list(extra_args)
    argv += [f"--data.fold={fold}", f"--trainer.default_root_dir={folder}"]
    if num_folds is not None:
        argv.append(f"--data.num_folds={num_folds}")
    cli = run_polyfm_cli(argv, run=False)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    checkpoint_dir = folder / "checkpoints"
    checkpointers = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    for index, callback in enumerate(checkpointers):
        # a recipe's fixed dirpath would make every fold overwrite the previous fold's files
        callback.dirpath = str(checkpoint_dir if index == 0 else folder / f"checkpoints-{index}")
    resume = checkpoint_dir / "last.ckpt"
    if resume.is_file():
        print(f"polyfm cv: fold {fold}: resuming from {resume}", file=sys.stderr)
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume) if resume.is_file() else None)
    best = next((cb.best_model_path for cb in checkpointers if cb.monitor and cb.best_model_path), "")
    if best:
        checkpoint = best
    elif checkpointers and checkpointers[0].last_model_path:
        checkpoint = checkpointers[0].last_model_path
    else:  # no checkpoint callback: keep the final weights for the ensemble anyway
        checkpoint = str(checkpoint_dir / "final.ckpt")
        trainer.save_checkpoint(checkpoint)
    result: dict[str, Any] = {"fold": fold, "checkpoint": checkpoint, "evaluated": "best" if best else "final"}
    result["validate"] = scalar_metrics(trainer.validate(model, datamodule=datamodule, ckpt_path=best or None, verbose=False))
    if test:
        result["test"] = scalar_metrics(trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False))
    del cli, trainer, model, datamodule
    gc.collect()
    return result


def run_cross_validation(
    configs: Sequence[str],
    extra_args: Sequence[str] = (),
    num_folds: int | None = None,
    folds: Sequence[int] | None = None,
    output: str | Path = "runs/cv",
    test: bool = False,
) -> dict[str, Any]:
    if not configs:
        raise ConfigError("polyfm cv needs a recipe: --config recipe.yaml")
    if folds is None:
        if num_folds is None:
            raise ConfigError("give --num-folds K (folds 0 .. K-1) or --folds with the dataset's own fold numbers (e.g. ESC-50: --folds 1 2 3 4 5)")
        folds = list(range(num_folds))
    if len(set(folds)) != len(folds) or len(folds) < 2:
        raise ConfigError(f"--folds {list(folds)}: cross-validation needs two or more distinct folds")
    check_fold_options(data_module_class(configs, extra_args), with_num_folds=num_folds is not None)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    # a finished fold is reused only for the same recipe and arguments: mixing runs would corrupt the summary
    setup = {"configs": [str(Path(c).resolve()) for c in configs], "args": list(extra_args), "num_folds": num_folds, "test": test}
    recipe_text = {str(Path(c).resolve()): Path(c).read_text() for c in configs if Path(c).is_file()}
    setup_file = output / "cv-setup.json"
    if setup_file.is_file():
        previous = json.loads(setup_file.read_text())
        if previous.get("setup") != setup or previous.get("recipes") != recipe_text:
            raise ConfigError(f"{output} holds a cross-validation with other recipes or arguments ({setup_file}): use a new --output, or delete that folder to start again.")
    else:
        with atomic_path(setup_file) as tmp:
            tmp.write_text(json.dumps({"setup": setup, "recipes": recipe_text}, indent=2))
    results: dict[int, dict[str, Any]] = {}
    for fold in folds:
        folder = output / f"fold{fold}"
        result_file = folder / "result.json"
        if result_file.is_file():
            results[fold] = json.loads(result_file.read_text())
            print(f"polyfm cv: fold {fold}: done before ({result_file})", file=sys.stderr)
            continue
        results[fold] = run_fold(fold, configs, extra_args, num_folds, folder, test)
        with atomic_path(result_file) as tmp:
            tmp.write_text(json.dumps(results[fold], indent=2))
    report = {"folds": list(folds), "summary": summarise(results), "checkpoints": [results[f]["checkpoint"] for f in folds]}
    with atomic_path(output / "cv.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    print(format_report(report, output, configs))
    return report


def format_report(report: dict[str, Any], output: Path, configs: Sequence[str]) -> str:
    lines = [f"cross-validation over folds {report['folds']} ({output / 'cv.json'}):"]
    for stage, metrics in report["summary"].items():
        for name, figures in metrics.items():
            lines.append(f"  {stage:<8} {name:<32} {figures['mean']:.4f} ± {figures['std']:.4f}")
    recipe = " ".join(f"--config {c}" for c in configs)
    lines.append(f"ensemble of the fold models:\n  polyfm predict {recipe} --ckpt_path {','.join(report['checkpoints'])}")
    return "\n".join(lines)
