"""What the four MONAI U-Net families share once wrapped in the encoder contract.

Each family class subclasses the MONAI network itself (MONAI builds every layer), so
its ``state_dict`` keys are exactly MONAI's and a MONAI bundle's ``model.pt`` loads
as is. This mixin adds the engine's contract on top:

* ``forward(x)``: MONAI's forward, dense logits ``(B, out_channels, *spatial)``;
* ``bottleneck_features(x)``: the encoder path only, the deepest feature map;
* ``forward_features(x)``: that map averaged over space, ``(B, feature_dim)``;
* ``block_names()``: parameter prefixes from input to output over MONAI's module tree
  (freeze-k, layer-wise LR decay and the linear probe read it);
* ``head_names()``: the task-specific output layers, which ``reset_head(n)`` rebuilds
  for a new number of classes (pretraining heads differ from fine-tuning heads; the
  rest of the encoder *and* decoder transfer);
* ``from_pretrained(path_or_name)``: a state dict file, a MONAI bundle folder or zip.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polyfm.core.encoder import Encoder
from polyfm.core.errors import CheckpointError
from polyfm.core.weights import (
    PretrainedMixin,
    WeightSpec,
    cache_dir,
    load_checkpoint_file,
    load_state_dict_checked,
    unwrap_state_dict,
)


class MedSegNet(Encoder, PretrainedMixin):
    """Mixin for MONAI segmentation networks (see module docstring)."""

    #: forward_features returns pooled bottleneck features; ``forward`` gives the dense logits.
    dense = False
    #: constructor arguments, recorded by each family so heads can be rebuilt and configs saved.
    config: dict[str, Any]

    # -- the contract ---------------------------------------------------------------------
    def bottleneck_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck_features(x).flatten(2).mean(-1)

    def head_names(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def num_outputs(self) -> int:
        return int(self.config["out_channels"])

    def head_parameter_names(self) -> list[str]:
        heads = tuple(self.head_names())
        return [n for n, _ in self.named_parameters() if any(n == h or n.startswith(h + ".") for h in heads)]

    def reset_head(self, out_channels: int) -> None:
        """Rebuild the output layers for ``out_channels`` classes (fresh MONAI init); the
        rest of the network keeps its weights. Built on the same device and dtype."""
        if out_channels == self.num_outputs:
            return
        fresh = type(self)(**{**self.config, "out_channels": out_channels})
        reference = next(self.parameters())
        for name in self.head_names():
            parent_name, _, attr = name.rpartition(".")
            parent = self.get_submodule(parent_name) if parent_name else self
            setattr(parent, attr, fresh.get_submodule(name).to(device=reference.device, dtype=reference.dtype))
        self.config["out_channels"] = out_channels
        self._after_reset_head(fresh)

    def _after_reset_head(self, fresh: nn.Module) -> None:
        """Hook for families whose heads are also referenced elsewhere (DynUNet's skip layers)."""

    # -- checkpoints ------------------------------------------------------------------------
    @classmethod
    def convert_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Official key layout -> ours. MONAI bundles are already ours; DDP's ``module.`` goes."""
        keys = list(state_dict)
        if keys and all(k.startswith("module.") for k in keys):
            return {k[len("module."):]: v for k, v in state_dict.items()}
        return dict(state_dict)

    @classmethod
    def checkpoint_ignores(cls, state_dict: Mapping[str, torch.Tensor]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(missing prefixes allowed, unexpected prefixes allowed) for a converted checkpoint."""
        return (), ()

    @classmethod
    def _from_checkpoint(cls, path: Path, spec: WeightSpec | None, **config: Any) -> MedSegNet:
        file, bundle_config = resolve_checkpoint(path)
        merged = {**bundle_config, **config}
        try:
            model = cls(**merged)
        except TypeError as exc:
            raise CheckpointError(f"{path}: cannot build {cls.__name__} from the configuration {merged}: {exc}") from exc
        raw = unwrap_state_dict(load_checkpoint_file(file))
        state = spec.converter(raw) if spec is not None and spec.converter is not None else cls.convert_state_dict(raw)
        ignore_missing, ignore_unexpected = cls.checkpoint_ignores(state)
        try:
            load_state_dict_checked(model, state, strict=True, ignore_missing=ignore_missing, ignore_unexpected=ignore_unexpected, source=str(file))
        except CheckpointError as exc:
            hint = cls.checkpoint_hint(state)
            raise CheckpointError(f"{exc}\n{hint}" if hint else str(exc)) from exc
        return model

    @classmethod
    def checkpoint_hint(cls, state_dict: Mapping[str, torch.Tensor]) -> str:
        """What the checkpoint itself says about the configuration it needs (shown on a mismatch)."""
        return ""


# ----------------------------------------------------------------------------- bundles


def resolve_checkpoint(path: Path) -> tuple[Path, dict[str, Any]]:
    """The weights file to read, and the network configuration a MONAI bundle declares.

    Accepts a state-dict file (``model.pt``, ``.pth``, ``.safetensors``), a bundle folder
    (``models/model.pt`` + ``configs/inference.json``) or a bundle zip as released on the
    MONAI model zoo (unpacked next to itself in the cache, once)."""
    path = Path(path)
    if path.is_file() and _is_bundle_zip(path):
        target = cache_dir() / "bundles" / path.stem
        if not target.exists():
            with zipfile.ZipFile(path) as archive:
                archive.extractall(target.with_name(target.name + ".tmp"))
            target.with_name(target.name + ".tmp").rename(target)
        inner = [p for p in target.rglob("model.pt") if p.parent.name == "models"]
        if not inner:
            raise CheckpointError(f"{path} is a zip without models/model.pt: is it a MONAI bundle?")
        path = inner[0].parent.parent
    if path.is_dir():
        for candidate in ("models/model.pt", "models/model.safetensors", "model.pt"):
            if (path / candidate).exists():
                return path / candidate, bundle_network_config(path)
        raise CheckpointError(
            f"{path} is a folder without models/model.pt: point from_pretrained at the bundle folder "
            "(holding models/ and configs/) or at the weights file itself."
        )
    return path, bundle_network_config(path.parent.parent) if path.parent.name == "models" else {}


def _is_bundle_zip(path: Path) -> bool:
    # torch.save writes zips too; a bundle is told apart by its models/model.pt entry.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("models/model.pt") for name in archive.namelist())


def bundle_network_config(bundle: Path) -> dict[str, Any]:
    """The constructor arguments of ``network_def`` in a bundle's configs/inference.json."""
    for name in ("inference.json", "train.json"):
        config_file = bundle / "configs" / name
        if config_file.exists():
            network = json.loads(config_file.read_text()).get("network_def", {})
            # img_size was removed from SwinUNETR in MONAI 1.5; bundles written before still carry it.
            return {k: v for k, v in network.items() if not k.startswith("_") and k != "img_size" and not str(v).startswith(("$", "@"))}
    return {}
