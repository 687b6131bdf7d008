"""The domain kit: what a domain package hands to studies and the demo."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import lightning as L

from polyfm.core.adaptation import Adaptation
from polyfm.core.encoder import Encoder


@dataclass
class DomainKit:
    name: str
    target: str
    metric: str
    higher_is_better: bool
    make_encoder: Callable[[], Encoder]
    make_pretraining: Callable[[Encoder], L.LightningModule]
    make_pretrain_data: Callable[[], L.LightningDataModule]
    make_task: Callable[[Encoder, Adaptation], L.LightningModule]
    make_finetune_data: Callable[[float, int], L.LightningDataModule]
    pretrain_epochs: int = 1
    finetune_epochs: int = 3
    data_source: str = "built-in samples"
    #: Optional: a transformer-trunk encoder over this domain's inputs (a new input adapter
    #: in front of ``polyfm.core.transfer.PatchTransformer`` blocks) built from
    #: ``trunk_config`` keys (embed_dim, depth, num_heads, mlp_ratio, post_norm, layer_scale);
    #: lets studies reuse transformer blocks pretrained in another domain.
    make_trunk_encoder: Callable[[dict[str, object]], Encoder] | None = None


_REGISTERED: dict[str, Callable[..., DomainKit]] = {}


def register_kit(name: str, factory: Callable[..., DomainKit]) -> None:
    """Add a kit in-process (tests, notebooks); installed packages use the entry point."""
    _REGISTERED[name] = factory


def installed_kits(include_registered: bool = True) -> list[str]:
    """Names of the domains whose kit is installed (entry points) or registered in-process."""
    names = {ep.name for ep in entry_points(group="polyfm.kits")}
    return sorted(names | set(_REGISTERED) if include_registered else names)


def load_kit(name: str, data_dir: Path | None, quick: bool = False) -> DomainKit:
    """Build one domain's kit; only that domain's package is imported."""
    if name in _REGISTERED:
        return _REGISTERED[name](data_dir, quick=quick)
    found = [ep for ep in entry_points(group="polyfm.kits") if ep.name == name]
    if not found:
        raise KeyError(f"No domain kit {name!r}; installed: {installed_kits()}. Install polyfm-{name}.")
    try:
        factory = found[0].load()
    except ImportError as exc:
        raise ImportError(f"The {name} kit ({found[0].value}) failed to import: {exc}. Reinstall polyfm-{name}.") from exc
    return factory(data_dir, quick=quick)
