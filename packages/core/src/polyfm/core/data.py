"""Data helpers every domain uses: the data-dir setting, label fractions, seeded
sampling (exact resume), and a DataModule over map-style datasets of dicts."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from polyfm.core.errors import ConfigError, DataError
from polyfm.core.performance import expected_host_sync


def data_dir(required: bool = False) -> Path | None:
    """The folder of real sample data (``POLYFM_DATA_DIR``), or None when unset."""
    value = os.environ.get("POLYFM_DATA_DIR")
    if not value:
        if required:
            raise ConfigError("POLYFM_DATA_DIR is not set: point it at the folder holding the sample datasets.")
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ConfigError(f"POLYFM_DATA_DIR={value} is not a folder.")
    return path


def label_fraction_indices(
    labels: Sequence[Any] | np.ndarray[Any, Any] | int,
    fraction: float,
    seed: int = 0,
    stratify: bool = True,
) -> np.ndarray[Any, Any]:
    """Indices of a reproducible ``fraction`` of a training split.

    With ``stratify`` and hashable labels (class ids), each class keeps its share
    (at least one sample per class present). Multi-label or continuous labels, or an
    int length, give a plain seeded random subset. The result is sorted, and a
    smaller fraction with the same seed is a subset of a larger one within each class.
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"label fraction must be in (0, 1], got {fraction}.")
    n = labels if isinstance(labels, int) else len(labels)
    rng = np.random.default_rng(seed)
    if fraction == 1.0:
        return np.arange(n)
    if isinstance(labels, int) or not stratify or not _is_categorical(labels):
        order = rng.permutation(n)
        return np.sort(order[: max(1, math.ceil(fraction * n))])
    label_array = np.asarray(labels)
    chosen: list[np.ndarray[Any, Any]] = []
    for value in np.unique(label_array):
        members = np.flatnonzero(label_array == value)
        members = members[rng.permutation(len(members))]
        chosen.append(members[: max(1, round(fraction * len(members)))])
    return np.sort(np.concatenate(chosen))


def check_fold(fold: int, num_folds: int, owner: str = "") -> None:
    """Refuse a fold that is not one of ``num_folds`` (2 or more); ``owner`` (e.g. ``"MyDataModule"``)
    names the arguments in the message, ``MyDataModule(fold=5)``."""
    def named(argument: str) -> str:
        return f"{owner}({argument})" if owner else argument

    if num_folds < 2:
        raise ConfigError(f"{named(f'num_folds={num_folds}')}: cross-validation needs 2 or more folds")
    if not 0 <= fold < num_folds:
        raise ConfigError(f"{named(f'fold={fold}')} is not one of the {num_folds} folds (0 .. {num_folds - 1})")


def fold_indices(
    n: int,
    num_folds: int,
    fold: int,
    groups: Sequence[Any] | None = None,
    seed: int = 0,
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """``(train, held_out)`` indices of fold ``fold`` of ``num_folds`` (k-fold cross-validation; the
    held-out part is the fold's validation set). Every item is held out in exactly one fold.

    With ``groups`` (a scaffold, a patient, a speaker, a scene per item) no group is split across
    folds: groups are dealt largest first to the fold with the fewest items so far (ties broken by a
    seeded order), which balances fold sizes as scikit-learn's ``GroupKFold`` does. Without groups
    the items are shuffled with ``seed`` and dealt round-robin. Both are sorted and depend on
    ``(n, num_folds, groups, seed)`` only, so each fold's run (another process, another day) agrees."""
    check_fold(fold, num_folds)
    rng = np.random.default_rng(seed)
    assignment = np.empty(n, dtype=np.int64)
    if groups is None:
        if n < num_folds:
            raise ConfigError(f"{n} items cannot fill {num_folds} folds: use num_folds <= {n}")
        assignment[rng.permutation(n)] = np.arange(n) % num_folds
    else:
        if len(groups) != n:
            raise ConfigError(f"{len(groups)} groups for {n} items: give one group per item")
        members: dict[Any, list[int]] = {}
        for index, group in enumerate(groups):
            members.setdefault(group, []).append(index)
        if len(members) < num_folds:
            raise ConfigError(f"{len(members)} groups cannot fill {num_folds} folds without splitting a group: use num_folds <= {len(members)}")
        by_group = list(members.values())
        tie_break = rng.permutation(len(by_group))
        order = sorted(range(len(by_group)), key=lambda g: (-len(by_group[g]), tie_break[g]))
        sizes = np.zeros(num_folds, dtype=np.int64)
        for g in order:
            indices = by_group[g]
            target = int(np.argmin(sizes))  # the emptiest fold (lowest id on ties)
            assignment[indices] = target
            sizes[target] += len(indices)
    return np.flatnonzero(assignment != fold), np.flatnonzero(assignment == fold)


def _is_categorical(labels: Sequence[Any] | np.ndarray[Any, Any]) -> bool:
    array = np.asarray(labels)
    if array.ndim != 1:
        return False
    if array.dtype.kind in "iub" or array.dtype.kind in "US" or array.dtype == object:
        return True
    return False


def expand_paths(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], suffixes: Sequence[str], what: str) -> list[Path]:
    """Files as given and, for folders, the files inside them (recursively, sorted) whose
    suffix is one of ``suffixes``. A missing path, or a folder with none of them, is an
    error naming it; ``what`` says what the paths should be (for the message)."""
    entries = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    wanted = {x.lower() for x in suffixes}
    files: list[Path] = []
    for entry in entries:
        path = Path(os.path.expandvars(str(entry))).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in wanted and p.is_file())
            if not found:
                raise DataError(f"folder holds no {'/'.join(sorted(wanted))} file ({what}).", path=path)
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"file or folder not found ({what}).", path=path)
    return files


class EpochSeededSampler(Sampler[int]):
    """A random order that depends only on (seed, epoch), so a resumed run sees the
    batches an uninterrupted one would. Lightning calls ``set_epoch`` each epoch."""

    def __init__(self, length: int, seed: int = 0, weights: Sequence[float] | None = None, num_samples: int | None = None) -> None:
        self.length, self.seed, self.epoch = length, seed, 0
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.num_samples = num_samples or length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_once(self, count: int) -> None:
        """Leave out the first ``count`` indices of the next pass (a mid-epoch resume)."""
        self._skip = count

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        skip, self._skip = getattr(self, "_skip", 0), 0
        with expected_host_sync():  # the order is drawn on the host, never on the device
            if self.weights is not None:  # balanced sampling (e.g. AudioSet tags): with replacement
                order = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator).tolist()
            else:
                order = torch.randperm(self.length, generator=generator).tolist()
        return iter(order[skip:])

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader[Any]):
    """A training DataLoader that Lightning resumes mid-epoch (its ``state_dict`` /
    ``load_state_dict`` interface): the state is the epoch and how many batches of it were
    handed out. The epoch's order is fixed by (seed, epoch), so leaving those batches out
    gives exactly the batches an uninterrupted run would see next. Without this, a run
    resumed from a step checkpoint restarts the epoch's order: it repeats the first
    batches and never sees the last ones."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # its own generator: starting an iterator draws the workers' base seed from it, and a
        # draw from the global RNG would shift a resumed run's dropout masks by one
        kwargs["generator"] = kwargs.get("generator") or torch.Generator()
        super().__init__(*args, **kwargs)
        self._served = 0
        self._resume_at: tuple[int | None, int] | None = None

    def _epoch(self) -> int | None:
        return getattr(self.sampler, "epoch", None)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch(), "batches_served": self._served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume_at = (state.get("epoch"), int(state.get("batches_served", 0)))

    def __iter__(self):  # type: ignore[no-untyped-def]
        # a generator: this body runs at the first batch, after Lightning has set the epoch
        skip = 0
        if self._resume_at is not None:
            epoch, served = self._resume_at
            self._resume_at = None
            if epoch == self._epoch() and 0 < served < len(self):  # saved mid-epoch, resumed in that epoch
                skip = served
        self._served = skip
        if isinstance(self.sampler, EpochSeededSampler) and self.generator is not None:  # worker seeds: a function of (seed, epoch)
            self.generator.manual_seed(self.sampler.seed * 100_003 + self.sampler.epoch + 1)
        sampler = self.sampler if isinstance(self.sampler, EpochSeededSampler) and self.batch_size is not None else None
        by_indices = sampler is not None
        if skip and sampler is not None:
            sampler.skip_once(skip * (self.batch_size or 1))  # leave the indices out: nothing is loaded for them
        with expected_host_sync():  # the workers' base seed is read on the host, from a CPU generator
            batches = super().__iter__()
        if skip and not by_indices:
            for _ in range(skip):  # a sampler we cannot tell (e.g. DDP's wrapper): load and drop them
                next(batches)
        for batch in batches:
            self._served += 1
            yield batch


class DictDataModule(L.LightningDataModule):
    """A DataModule over map-style train/val/test datasets that yield dicts.

    Subclasses implement ``build()`` returning ``(train, val, test)`` and, for
    stratified label fractions, ``train_labels()``. ``label_fraction`` keeps a
    reproducible subset of the training split."""

    def __init__(
        self,
        batch_size: int = 32,
        num_workers: int = 0,
        label_fraction: float = 1.0,
        seed: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        super().__init__()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.label_fraction, self.seed = label_fraction, seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.collate_fn = collate_fn
        self.train_set: Dataset[Any] | None = None
        self.val_set: Dataset[Any] | None = None
        self.test_set: Dataset[Any] | None = None

    def build(self) -> tuple[Dataset[Any], Dataset[Any] | None, Dataset[Any] | None]:  # pragma: no cover - abstract
        raise NotImplementedError

    def train_labels(self) -> Sequence[Any] | None:
        """Per-sample labels of the full training split, for stratified fractions."""
        return None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, self.val_set, self.test_set = self.build()
        if self.label_fraction < 1.0:
            labels = self.train_labels()
            indices = label_fraction_indices(labels if labels is not None else len(train), self.label_fraction, self.seed)  # type: ignore[arg-type]
            train = Subset(train, indices.tolist())
        self.train_set = train

    def _loader(self, dataset: Dataset[Any] | None, train: bool) -> DataLoader[Any]:
        if dataset is None:
            raise ConfigError(
                f"{type(self).__name__} has no {'train' if train else 'evaluation'} split: give it "
                + ("training data." if train else "a test or validation split (more data, or a val_fraction above 0).")
            )
        sampler = EpochSeededSampler(len(dataset), self.seed) if train else None  # type: ignore[arg-type]
        return (ResumableDataLoader if train else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=self.collate_fn,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader[Any] | list[Any]:
        if self.val_set is None:  # e.g. val_fraction=0: Lightning runs no validation loop for []
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(f"{type(self).__name__}: no validation split; training runs without validation.")
            return []
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.test_set if self.test_set is not None else self.val_set, False)

    def predict_dataloader(self) -> DataLoader[Any]:
        return self.test_dataloader()


class TensorDictDataset(Dataset[dict[str, Any]]):
    """A dataset over tensors of equal length, yielding ``{"input": x[i], "target": y[i]}``."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, meta: Sequence[Any] | None = None) -> None:
        if len(inputs) != len(targets):
            raise ConfigError(f"inputs ({len(inputs)}) and targets ({len(targets)}) differ in length.")
        self.inputs, self.targets, self.meta = inputs, targets, meta

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"input": self.inputs[index], "target": self.targets[index]}
        if self.meta is not None:
            item["meta"] = self.meta[index]
        return item
