"""Official checkpoints: one registry, safe loading, checksums and readable key diffs.

Domain packages describe each released checkpoint with a :class:`WeightSpec` and
expose a list of them through the ``polyfm.weights`` entry-point group. Files are
fetched into a cache (``$POLYFM_CACHE`` or ``~/.cache/polyfm``) and verified by
sha256 before use; with no network, the error names the file and the folder to
put it in. Pickles are only ever read with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import shutil
import urllib.request
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from polyfm.core.errors import CheckpointError
from polyfm.core.files import atomic_path

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class WeightSpec:
    """One released checkpoint.

    ``files`` maps a file name (as stored in the cache folder) to ``(url, checksum)``:
    a sha256 in hex, or ``"<algorithm>:<hex>"`` for what publishers give instead
    (``md5:`` on Zenodo, ``sha1:`` in the MONAI model zoo); ``None`` means the publisher
    gives none and the file is recorded as unverified. ``converter`` turns the official key layout into ours (identity when
    they are the same). ``meta`` carries what a user must not get wrong: bands and
    normalisation, sample rate, tokenizer, context length.
    """

    name: str
    family: str
    files: Mapping[str, tuple[str, str | None]]
    license: str
    meta: Mapping[str, Any] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)
    converter: Callable[[Mapping[str, Any]], StateDict] | None = None
    description: str = ""

    @property
    def primary_file(self) -> str:
        return next(iter(self.files))


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, WeightSpec] = {}
_LOADED_ENTRY_POINTS = False
_BROKEN_ENTRY_POINTS: dict[str, str] = {}


def register_weights(*specs: WeightSpec) -> None:
    for spec in specs:
        _REGISTRY[spec.name] = spec


def _load_entry_points() -> None:
    global _LOADED_ENTRY_POINTS
    if _LOADED_ENTRY_POINTS:
        return
    _LOADED_ENTRY_POINTS = True
    for ep in entry_points(group="polyfm.weights"):
        try:
            specs = ep.load()
        except ImportError as exc:  # one broken domain package must not hide the others' weights
            _BROKEN_ENTRY_POINTS[ep.name] = f"{ep.value}: {exc}"
            warnings.warn(f"polyfm.weights entry point {ep.name!r} ({ep.value}) failed to import: {exc}", stacklevel=2)
            continue
        register_weights(*(specs() if callable(specs) else specs))


def list_weights(family: str | None = None) -> list[WeightSpec]:
    _load_entry_points()
    return [s for s in _REGISTRY.values() if family is None or s.family == family]


def get_weights(name: str) -> WeightSpec:
    _load_entry_points()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "(none: is the domain package installed?)"
        broken = "".join(f" Entry point {k} failed to import ({v})." for k, v in _BROKEN_ENTRY_POINTS.items())
        raise KeyError(f"No registered weights named {name!r}. Known: {known}.{broken} `polyfm weights list` shows them.")
    return _REGISTRY[name]


# ----------------------------------------------------------------------------- cache and download


def cache_dir() -> Path:
    return Path(os.environ.get("POLYFM_CACHE", Path.home() / ".cache" / "polyfm")).expanduser()


def weights_dir(spec: WeightSpec) -> Path:
    return cache_dir() / "weights" / spec.name


#: Checksum algorithms publishers give (``"md5:<hex>"``); a bare hex digest is sha256.
CHECKSUM_ALGORITHMS = ("sha256", "sha1", "md5", "sha512")


def file_digest(path: Path, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    digest = hashlib.new(algorithm, usedforsecurity=False) if algorithm in ("md5", "sha1") else hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def parse_checksum(expected: str) -> tuple[str, str]:
    """``"sha1:ab12..."`` -> ``("sha1", "ab12...")``; a bare digest is sha256."""
    algorithm, _, digest = expected.rpartition(":")
    algorithm = algorithm.lower() or "sha256"
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise CheckpointError(f"checksum {expected!r}: unknown algorithm {algorithm!r}; write '<algorithm>:<hex>' with one of {CHECKSUM_ALGORITHMS}")
    return algorithm, digest.lower()


def verify_file(path: Path, expected: str | None) -> None:
    if expected is None:
        return
    algorithm, digest = parse_checksum(expected)
    actual = file_digest(path, algorithm)
    if actual != digest:
        raise CheckpointError(
            f"Checksum mismatch for {path}: expected {algorithm} {digest}, got {actual}. "
            "The file is corrupt or not the released one; delete it and fetch again."
        )


def fetch_weights(spec: WeightSpec | str, offline: bool | None = None) -> Path:
    """Return the folder holding all of ``spec``'s files, downloading what is missing.

    Every file is checked against its sha256 before the folder is returned.
    """
    spec = get_weights(spec) if isinstance(spec, str) else spec
    folder = weights_dir(spec)
    offline = os.environ.get("POLYFM_OFFLINE", "0") not in ("", "0") if offline is None else offline
    for filename, (url, sha) in spec.files.items():
        target = folder / filename
        if not target.exists():
            if offline:
                raise CheckpointError(_offline_message(spec, filename, url, target))
            try:
                download(url, target, sha)
            except OSError as exc:
                raise CheckpointError(f"{_offline_message(spec, filename, url, target)} (download failed: {exc})") from exc
        verify_file(target, sha)
    return folder


def _offline_message(spec: WeightSpec, filename: str, url: str, target: Path) -> str:
    return (
        f"Weights {spec.name!r} need the file {filename!r}, which is not in the cache and cannot be downloaded "
        f"here. Download it from {url} and put it at {target} (set POLYFM_CACHE to move the cache)."
    )


def download(url: str, target: Path, sha256: str | None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``target`` through a temporary file; verify before the rename."""
    with atomic_path(target) as temporary:
        with open(temporary, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            shutil.copyfileobj(response, out)
        verify_file(temporary, sha256)
    return target


# ----------------------------------------------------------------------------- safe loading


def plain_data_globals() -> list[Any]:
    """Classes official checkpoints use for plain data, allowed under ``weights_only=True``:
    ``argparse.Namespace`` (training arguments of MAE/SatMAE, Uni-Mol, ...) and numpy's array,
    scalar and dtype rebuilders (PANNs' sampler state, best scores). They rebuild data from
    bytes and run no other code; anything else in a pickle is still refused."""
    import numpy as np
    from numpy._core import multiarray

    allowed: list[Any] = [argparse.Namespace, np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar]
    allowed += [(multiarray._reconstruct, "numpy.core.multiarray._reconstruct"), (multiarray.scalar, "numpy.core.multiarray.scalar")]
    allowed += [type(np.dtype(code)) for code in ("b", "B", "h", "H", "i", "I", "l", "L", "q", "Q", "e", "f", "d", "?", "U", "S")]
    return allowed


def load_checkpoint_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint safely: safetensors as is, pickles only with ``weights_only=True``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Checkpoint file {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    try:
        with torch.serialization.safe_globals(plain_data_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"Refused to load {path}: it holds Python objects other than tensors and plain containers, "
            "and loading it would run code from the file. polyfm loads checkpoints with weights_only=True only. "
            "If you trust the file, convert it to safetensors in a separate process, or re-save only its "
            f"state_dict. Detail: {str(exc).splitlines()[0]}"
        ) from exc
    except Exception as exc:  # random or truncated bytes fail anywhere inside the unpickler
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {type(exc).__name__}: {exc}. Download it again."
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of tensors.")
    return obj


def unwrap_state_dict(obj: Mapping[str, Any], keys: Iterable[str] = ("state_dict", "model", "module", "network_weights")) -> StateDict:
    """Find the state dict inside common wrappers (``{'model': ...}``, ``{'state_dict': ...}``)."""
    current: Any = obj
    for _ in range(3):
        if isinstance(current, Mapping) and current and all(isinstance(v, torch.Tensor) for v in current.values()):
            return dict(current)
        inner = next((current[k] for k in keys if isinstance(current, Mapping) and isinstance(current.get(k), Mapping)), None)
        if inner is None:
            break
        current = inner
    if isinstance(current, Mapping):
        return {k: v for k, v in current.items() if isinstance(v, torch.Tensor)}
    raise CheckpointError("No state dict of tensors found in the checkpoint.")


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """Drop ``prefix`` from every key that has it (e.g. DDP's ``module.``)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> Path:
    """Write a state dict as safetensors, atomically (temp file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as temporary:
        # clone: tied weights (e.g. RoBERTa's decoder and word embeddings) share storage, which safetensors refuses
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in state_dict.items()}, str(temporary), metadata=metadata)
    return path


# ----------------------------------------------------------------------------- key checks


@dataclass
class KeyDiff:
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def report(self, limit: int = 20) -> str:
        lines: list[str] = []

        def section(title: str, items: list[str]) -> None:
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines.extend(f"  {item}" for item in items[:limit])
                if len(items) > limit:
                    lines.append(f"  ... and {len(items) - limit} more")

        section("missing from the checkpoint", self.missing)
        section("unexpected in the checkpoint", self.unexpected)
        section(
            "shape mismatch (model vs checkpoint)",
            [f"{k}: {tuple(m)} vs {tuple(c)}" for k, m, c in self.mismatched],
        )
        hint = _prefix_hint(self.missing, self.unexpected)
        if hint:
            lines.append(hint)
        return "\n".join(lines)


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """Spot the usual cause of a total mismatch: a prefix added or dropped."""
    if not missing or not unexpected:
        return ""
    for extra in ("module.", "_orig_mod.", "model.", "encoder.", "backbone.", "swinViT."):  # DataParallel/DDP, torch.compile, wrappers
        if sum(1 for k in unexpected if k.startswith(extra) and k[len(extra):] in set(missing)) >= max(1, len(missing) // 2):
            return f"hint: the checkpoint keys carry a '{extra}' prefix the model does not; strip it."
        if sum(1 for k in missing if k.startswith(extra) and k[len(extra):] in set(unexpected)) >= max(1, len(unexpected) // 2):
            return f"hint: the model keys carry a '{extra}' prefix the checkpoint does not; add it."
    return ""


def diff_keys(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> KeyDiff:
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    mismatched = sorted(
        (k, tuple(own[k].shape), tuple(state_dict[k].shape))
        for k in own
        if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)
    )
    return KeyDiff(missing, unexpected, mismatched)


def load_state_dict_checked(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    strict: bool = True,
    ignore_missing: Iterable[str] = (),
    ignore_unexpected: Iterable[str] = (),
    source: str = "checkpoint",
    warn: bool = True,
) -> KeyDiff:
    """Load with a readable diff. Non-strict loading still refuses shape mismatches, and
    warns with the keys it left out (``warn=False`` for callers that judge the returned
    diff and report it themselves).

    ``ignore_missing``/``ignore_unexpected`` are key prefixes that may legitimately
    differ (a new task head, a pretraining decoder dropped for fine-tuning).
    """
    diff = diff_keys(model, state_dict)
    ignore_missing, ignore_unexpected = tuple(ignore_missing), tuple(ignore_unexpected)
    diff.missing = [k for k in diff.missing if not k.startswith(ignore_missing)] if ignore_missing else diff.missing
    diff.unexpected = [k for k in diff.unexpected if not k.startswith(ignore_unexpected)] if ignore_unexpected else diff.unexpected
    if diff.mismatched or (strict and not diff.ok):
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}:\n{diff.report()}\n"
            "Check that the model configuration matches the checkpoint (see its registry meta); to take only what fits, "
            "load the state yourself with polyfm.core.weights.load_state_dict_checked(model, state, strict=False)."
        )
    if warn and not diff.ok:  # non-strict: load what fits, but never leave keys out without saying which
        warnings.warn(f"{source} loaded into {type(model).__name__} without some keys:\n{diff.report()}", stacklevel=2)
    fitting = {k: v for k, v in state_dict.items() if k in model.state_dict()}
    model.load_state_dict(fitting, strict=False)
    return diff


# ----------------------------------------------------------------------------- from_pretrained

M = TypeVar("M", bound="PretrainedMixin")


class PretrainedMixin:
    """``from_pretrained(name_or_path, **config)`` for every model class.

    A subclass implements ``_from_checkpoint(path, spec, **config)`` which builds the
    model from a local file or folder (``spec`` is ``None`` for a bare path) and
    loads it with :func:`load_state_dict_checked`. Resolution of names, the cache,
    checksums and the offline error are shared here.
    """

    @classmethod
    def from_pretrained(cls: type[M], name_or_path: str | os.PathLike[str], **config: Any) -> M:
        path = Path(name_or_path).expanduser()
        if path.exists():
            return cls._from_checkpoint(path, None, **config)
        spec = get_weights(str(name_or_path))
        folder = fetch_weights(spec)
        merged = {**dict(spec.config), **config}
        target = folder if len(spec.files) > 1 else folder / spec.primary_file
        return cls._from_checkpoint(target, spec, **merged)

    @classmethod
    def _from_checkpoint(cls: type[M], path: Path, spec: WeightSpec | None, **config: Any) -> M:  # pragma: no cover
        raise NotImplementedError
