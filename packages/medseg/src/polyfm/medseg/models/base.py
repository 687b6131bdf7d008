"""What the MONAI U-Net families share once wrapped in the encoder contract.

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

import inspect
import json
import logging
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polyfm.core.encoder import Encoder
from polyfm.core.errors import CheckpointError
from polyfm.core.safety import safe_extract
from polyfm.core.weights import (
    PretrainedMixin,
    WeightSpec,
    cache_dir,
    fetch_weights,
    get_weights,
    load_checkpoint_file,
    load_state_dict_checked,
    unwrap_state_dict,
)

log = logging.getLogger(__name__)


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
    def monai_class(cls) -> type[nn.Module]:
        """The MONAI class this family subclasses (what a bundle's ``network_def._target_`` names)."""
        return next(base for base in cls.__mro__ if base.__module__.startswith("monai.") and issubclass(base, nn.Module))

    @classmethod
    def monai_name(cls) -> str:
        return cls.monai_class().__name__

    @classmethod
    def monai_defaults(cls) -> dict[str, Any]:
        """MONAI's defaults where ours differ (UNet's ``num_res_units`` 0 vs 2, SwinUNETR's ``feature_size`` 24 vs 48)."""
        ours = inspect.signature(cls.__init__).parameters
        return {
            name: p.default
            for name, p in inspect.signature(cls.monai_class().__init__).parameters.items()
            if name in ours and p.default is not p.empty and ours[name].default is not p.empty and ours[name].default != p.default
        }

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

    def fit_checkpoint(self, state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """Last adjustment that needs the built model (DynUNet drops training-only heads); logs what it drops."""
        return state_dict

    @classmethod
    def _from_checkpoint(cls, path: Path, spec: WeightSpec | None, **config: Any) -> MedSegNet:
        file, bundle_config = resolve_checkpoint(path, cls.monai_name())
        raw = load_checkpoint_file(file)
        checkpoint_config, raw = cls.foreign_checkpoint(raw, file)
        bundle_config = {**bundle_config, **checkpoint_config}
        unresolved = {k: v for k, v in bundle_config.items() if isinstance(v, Unresolved) and k not in config}
        if unresolved:
            shown = ", ".join(f"{k}={v.expression!r}" for k, v in unresolved.items())
            raise CheckpointError(
                f"{unresolved[next(iter(unresolved))].source}: network_def sets {shown}, an expression polyfm does not "
                f"evaluate (it would run code from the bundle). Pass the value(s) yourself, e.g. "
                f"{cls.__name__}.from_pretrained(..., {', '.join(f'{k}=...' for k in unresolved)})."
            )
        if bundle_config:  # a bundle's network_def is written against MONAI's defaults, not ours
            bundle_config = {**cls.monai_defaults(), **bundle_config}
            if "img_size" not in inspect.signature(cls.__init__).parameters:  # SwinUNETR's, removed in MONAI 1.5
                bundle_config.pop("img_size", None)
        merged = {**{k: v for k, v in bundle_config.items() if not isinstance(v, Unresolved)}, **config}
        try:
            model = cls(**merged)
        except TypeError as exc:
            raise CheckpointError(f"{path}: cannot build {cls.__name__} from the configuration {merged}: {exc}") from exc
        # out_channels given: the classes of the task at hand; output layers of another class count stay fresh
        # (as reset_head after loading; nnU-Net's own fine-tuning skips the .seg_layers. the same way)
        model._load_state(raw, file, spec, task_head="out_channels" in config)
        return model

    def load_pretrained(self, name_or_path: str | Path) -> None:
        """Load a checkpoint (a registered name, a file, a bundle folder or zip, a ``polyfm fit`` .ckpt,
        pretraining's included) into this network *as it is built*: the path of ``polyfm fit`` recipes,
        where the YAML builds the network and ``VolumeSegmentation(pretrained=...)`` loads it.

        The output layers are task-specific: where the checkpoint's head differs in shape (a 5-class
        Volume Fusion head, a 14-organ BTCV head) it is left out and keeps its fresh initialisation."""
        path, spec = Path(name_or_path).expanduser(), None
        if not path.exists():
            spec = get_weights(str(name_or_path))
            folder = fetch_weights(spec)
            path = folder if len(spec.files) > 1 else folder / spec.primary_file
        file, _ = resolve_checkpoint(path, self.monai_name())
        _, raw = self.foreign_checkpoint(load_checkpoint_file(file), file)
        self._load_state(raw, file, spec, task_head=True)

    def _load_state(self, raw: dict[str, Any], file: Path, spec: WeightSpec | None, task_head: bool = False) -> None:
        raw = _network_of_task(self, unwrap_state_dict(raw), file)
        state = spec.converter(raw) if spec is not None and spec.converter is not None else self.convert_state_dict(raw)
        state = self.fit_checkpoint(state, str(file))
        ignore_missing, ignore_unexpected = self.checkpoint_ignores(state)
        if task_head:  # a head of another class count: leave it out, it is rebuilt for the task anyway
            own = self.state_dict(keep_vars=True)
            # a head's tensors also listed under other names (DynUNet's skip_layers...super_head) go with it
            head_tensors = {id(v) for k, v in own.items() if k.startswith(tuple(f"{h}." for h in self.head_names()))}
            heads = (*(f"{h}." for h in self.head_names()), *(k for k, v in own.items() if id(v) in head_tensors))
            other = sorted(k for k, v in state.items() if k.startswith(heads) and k in own and own[k].shape != v.shape)
            if other:
                log.info("%s: the output layers (%s) have another shape here; they keep their fresh initialisation.", file, ", ".join(other))
            state = {k: v for k, v in state.items() if k not in other}
            ignore_missing = (*ignore_missing, *heads)
        try:
            load_state_dict_checked(self, state, strict=True, ignore_missing=ignore_missing, ignore_unexpected=ignore_unexpected, source=str(file))
        except CheckpointError as exc:
            hint = self.checkpoint_hint(state)
            if any(".lora_A." in k for k in state):
                hint += (
                    "\nThe checkpoint holds LoRA adapters (lora_A/lora_B around base_layer): fold them in first, "
                    "polyfm.core.adaptation.merge_lora(task.model), and save task.model.state_dict()."
                )
            raise CheckpointError(f"{exc}\n{hint.strip()}" if hint.strip() else str(exc)) from exc
        # top-level modules, or Swin-ViT stages (a v2 model's layers{i}c are new to v1 SSL weights); a tensor
        # listed under two names (DynUNet's skip_layers) is named once, by its first name
        tensors = self.state_dict(keep_vars=True)
        loaded = {id(v) for k, v in tensors.items() if k in state}
        first = {id(v): k for k, v in reversed(tensors.items())}
        unloaded = [k for k, v in tensors.items() if id(v) not in loaded and first[id(v)] == k]
        fresh = sorted({".".join(k.split(".")[: 2 if k.startswith("swinViT.") else 1]) for k in unloaded})
        if fresh:  # allowed by checkpoint_ignores (a decoder new to encoder-only weights): say so
            log.info("%s: %s not in the checkpoint; they keep their fresh initialisation.", file, ", ".join(fresh))

    @classmethod
    def checkpoint_hint(cls, state_dict: Mapping[str, torch.Tensor]) -> str:
        """What the checkpoint itself says about the configuration it needs (shown on a mismatch)."""
        return ""

    @classmethod
    def foreign_checkpoint(cls, checkpoint: dict[str, Any], file: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """(constructor arguments the checkpoint implies, the checkpoint in MONAI's layout) for checkpoints
        of other frameworks; refuses the ones this family cannot hold. Only DynUNet takes nnU-Net's."""
        from polyfm.medseg.nnunet import is_nnunet_checkpoint

        if is_nnunet_checkpoint(checkpoint):
            raise CheckpointError(
                f"{file} is an nnU-Net checkpoint ({checkpoint.get('trainer_name', 'unknown trainer')}; 'network_weights' in "
                "dynamic-network-architectures' layout: encoder.stages.*, decoder.seg_layers.*). Load it with "
                f"polyfm.medseg.models.DynUNet.from_pretrained (nnU-Net's PlainConvUNet is a DynUNet), not {cls.__name__}."
            )
        return {}, checkpoint


def _network_of_task(model: nn.Module, state: dict[str, torch.Tensor], file: Path) -> dict[str, torch.Tensor]:
    """A polyfm (Lightning) task checkpoint holds the network under ``model.``: take it out.

    Only when the keys do not already fit (MONAI's UNet has its own ``model.`` prefix) and the
    stripped keys cover most of the network."""
    own = set(model.state_dict())
    if not state or own & set(state):
        return state
    inner = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    if 2 * len(own & set(inner)) < len(own):
        return state
    dropped = len(state) - len(inner)
    log.info("%s: a task checkpoint; loading the network under 'model.'%s.", file, f" ({dropped} other tensors left out)" if dropped else "")
    return inner


# ----------------------------------------------------------------------------- bundles

#: config files a bundle declares its network in, most specific first; other configs/*.json|yaml follow
BUNDLE_CONFIGS = ("inference.json", "inference.yaml", "inference.yml", "train.json", "train.yaml", "train.yml")
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")


class Unresolved:
    """A ``$`` expression (or ``%`` macro) in a bundle's network_def: code polyfm does not run."""

    def __init__(self, expression: str, source: Path) -> None:
        self.expression, self.source = expression, source

    def __repr__(self) -> str:
        return f"Unresolved({self.expression!r})"


def resolve_checkpoint(path: Path, family: str | None = None) -> tuple[Path, dict[str, Any]]:
    """The weights file to read, and the network configuration a MONAI bundle declares for ``family``.

    Accepts a state-dict file (``model.pt``, ``.pth``, ``.safetensors``), a bundle folder
    (``models/*.pt`` + ``configs/inference.json|yaml``) or a bundle zip as released on the
    MONAI model zoo (unpacked into the cache, once per file version)."""
    path = Path(path)
    if path.is_file() and _is_bundle_zip(path):
        stat = path.stat()
        target = cache_dir() / "bundles" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"  # a changed zip unpacks anew
        if not target.exists():
            staging = target.with_name(target.name + ".tmp")
            safe_extract(path, staging)
            staging.rename(target)
        roots = sorted({p.parent.parent for p in target.rglob("*") if p.parent.name in ("models", "configs") and p.is_file()})
        if not roots:
            raise CheckpointError(f"{path} is a zip without models/ or configs/: is it a MONAI bundle?")
        path = roots[0]
    if path.is_dir():
        return _bundle_weights(path), bundle_network_config(path, family)
    return path, bundle_network_config(path.parent.parent, family) if path.parent.name == "models" else {}


def _bundle_weights(bundle: Path) -> Path:
    for candidate in ("models/model.pt", "models/model.safetensors", "model.pt"):
        if (bundle / candidate).exists():
            return bundle / candidate
    found = sorted(p for p in (bundle / "models").glob("*") if p.suffix in WEIGHT_SUFFIXES) if (bundle / "models").is_dir() else []
    if len(found) == 1:  # e.g. pediatric_abdominal_ct_segmentation ships models/dynunet_FT.pt
        return found[0]
    if found:
        raise CheckpointError(
            f"{bundle}/models holds several weight files ({', '.join(p.name for p in found)}) and no model.pt: "
            "point from_pretrained at the one you want (the bundle's configs are still read)."
        )
    raise CheckpointError(
        f"{bundle} is a folder without models/model.pt: point from_pretrained at the bundle folder "
        "(holding models/ and configs/) or at the weights file itself."
    )


def _is_bundle_zip(path: Path) -> bool:
    # torch.save writes zips too; a bundle is told apart by its models/ weights or configs/metadata.json.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith(("models/model.pt", "configs/metadata.json")) for name in archive.namelist())


def _read_config(file: Path) -> Any:
    import yaml  # PyYAML comes with polyfm-core (lightning); safe_load builds plain data only

    try:
        return json.loads(file.read_text()) if file.suffix == ".json" else yaml.safe_load(file.read_text())
    except (ValueError, yaml.YAMLError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{file}: not a readable bundle config ({type(exc).__name__}: {exc}).") from exc


def _resolve(value: Any, config: Mapping[str, Any], file: Path, depth: int = 0) -> Any:
    """Follow ``@name`` / ``@a#b#0`` references of a bundle config to their literal values."""
    if depth > 20:
        raise CheckpointError(f"{file}: the references in network_def loop ({value!r}).")
    if isinstance(value, list):
        return [_resolve(v, config, file, depth + 1) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, config, file, depth + 1) for k, v in value.items()}
    if not isinstance(value, str):
        return value
    if value.startswith(("$", "%")):
        return Unresolved(value, file)
    if not value.startswith("@"):
        return value
    node: Any = config
    for part in value[1:].split("#"):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise CheckpointError(f"{file}: network_def refers to {value!r}, which the config does not define.")
    return _resolve(node, config, file, depth + 1)


def bundle_network_config(bundle: Path, family: str | None = None) -> dict[str, Any]:
    """The constructor arguments of ``network_def`` in a bundle's configs, references resolved.

    Looks in inference/train (json or yaml), then the other configs; with ``family`` (a MONAI class
    name) takes the first whose ``_target_`` is that class, and refuses a bundle that only declares
    other networks. ``$`` expressions come back as :class:`Unresolved` (polyfm runs no bundle code)."""
    folder = bundle / "configs"
    if not folder.is_dir():
        return {}
    others = sorted(p for p in folder.iterdir() if p.suffix in (".json", ".yaml", ".yml") and p.name not in BUNDLE_CONFIGS)
    declared: list[str] = []
    for config_file in [folder / n for n in BUNDLE_CONFIGS if (folder / n).exists()] + others:
        if config_file.name == "metadata.json":
            continue
        config = _read_config(config_file)
        network = config.get("network_def") if isinstance(config, dict) else None
        if not isinstance(network, dict):
            continue
        target = str(network.get("_target_", "")).rsplit(".", 1)[-1]
        if family is not None and target and target.lower() != family.lower():  # MONAI's aliases: Unet, DynUnet, ...
            declared.append(f"{config_file.name}: {target}")
            continue
        return {k: _resolve(v, config, config_file) for k, v in network.items() if not k.startswith("_")}
    if declared:
        from polyfm.medseg.models import MODELS

        ours = {m.monai_name().lower(): m.__name__ for m in MODELS.values()}
        targets = [t.split(": ")[1].lower() for t in declared]
        suggestions = sorted({f"polyfm.medseg.models.{ours[t]}.from_pretrained" for t in targets if t in ours})
        raise CheckpointError(
            f"{bundle} declares no {family} network (network_def in {'; '.join(declared)}). "
            + (f"Load it with {' or '.join(suggestions)}." if suggestions else "polyfm has no family for that network.")
        )
    return {}
