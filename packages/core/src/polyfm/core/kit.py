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


def installed_kits() -> dict[str, Callable[..., DomainKit]]:
    """Kit factories of the installed domain packages, by domain name."""
    return {ep.name: ep.load() for ep in sorted(entry_points(group="polyfm.kits"), key=lambda e: e.name)}


def load_kit(name: str, data_dir: Path | None, quick: bool = False) -> DomainKit:
    kits = installed_kits()
    if name not in kits:
        raise KeyError(f"No domain kit {name!r}; installed: {sorted(kits)}. Install polyfm-{name}.")
    return kits[name](data_dir, quick=quick)
