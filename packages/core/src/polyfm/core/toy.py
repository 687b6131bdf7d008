"""A toy encoder and dataset for the engine's own tests, docs and recipes.

Small enough to train in a second on a CPU, but with what real encoders have that
the engine must handle: a stem, repeated blocks, BatchNorm statistics, a final norm.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from polyfm.core.data import DictDataModule, TensorDictDataset, fold_indices
from polyfm.core.encoder import Encoder
from polyfm.core.weights import PretrainedMixin, WeightSpec, load_checkpoint_file, load_state_dict_checked, unwrap_state_dict


class ToyEncoder(Encoder, PretrainedMixin):
    """An MLP trunk: ``stem`` -> ``blocks.0..depth-1`` (residual, BatchNorm) -> ``norm``."""

    def __init__(self, in_features: int = 8, width: int = 32, depth: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.feature_dim = width
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.GELU(), nn.Dropout(dropout)) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)

    def block_names(self) -> list[str]:
        return ["stem", *(f"blocks.{i}" for i in range(len(self.blocks))), "norm"]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.norm(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    @classmethod
    def _from_checkpoint(cls, path: Path, spec: WeightSpec | None, **config: Any) -> ToyEncoder:
        model = cls(**config)
        load_state_dict_checked(model, unwrap_state_dict(load_checkpoint_file(path)), source=str(path))
        return model


def make_blobs(n: int, in_features: int = 8, num_classes: int = 3, seed: int = 0, noise: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs: a separable but not trivial classification problem."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, in_features, generator=torch.Generator().manual_seed(1234)) * 2.0
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    inputs = centres[labels] + noise * torch.randn(n, in_features, generator=generator)
    return inputs, labels


class ToyDataModule(DictDataModule):
    """Blobs split into train/val/test, yielding ``{"input", "target", "meta"}``. With ``fold``
    (0 .. ``num_folds`` - 1) train and val are pooled and dealt into folds (k-fold cross-validation)."""

    def __init__(
        self,
        n_train: int = 256,
        n_val: int = 128,
        in_features: int = 8,
        num_classes: int = 3,
        noise: float = 1.0,
        batch_size: int = 32,
        num_workers: int = 0,
        label_fraction: float = 1.0,
        seed: int = 0,
        fold: int | None = None,
        num_folds: int = 5,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, label_fraction=label_fraction, seed=seed)
        self.n_train, self.n_val, self.in_features, self.num_classes, self.noise = n_train, n_val, in_features, num_classes, noise
        self.fold, self.num_folds = fold, num_folds
        self._train_labels: torch.Tensor | None = None

    def _split(self, n: int, seed: int) -> TensorDictDataset:
        x, y = make_blobs(n, self.in_features, self.num_classes, seed=seed, noise=self.noise)
        return TensorDictDataset(x, y, meta=[f"blob-{seed}-{i}" for i in range(n)])

    def build(self) -> tuple[TensorDictDataset, TensorDictDataset, TensorDictDataset]:
        if self.fold is None:
            train, val = self._split(self.n_train, 1), self._split(self.n_val, 2)
        else:
            n = self.n_train + self.n_val
            x, y = make_blobs(n, self.in_features, self.num_classes, seed=1, noise=self.noise)
            train_idx, val_idx = fold_indices(n, self.num_folds, self.fold, seed=self.seed)
            train, val = (TensorDictDataset(x[i], y[i], meta=[f"blob-1-{j}" for j in i]) for i in (train_idx, val_idx))
        self._train_labels = train.targets
        return train, val, self._split(self.n_val, 3)

    def train_labels(self) -> list[int] | None:
        return None if self._train_labels is None else self._train_labels.tolist()


class _Supervised(torch.nn.Module):
    """Pretraining objective of the toy kit: supervised on a larger labelled pool."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(width, num_classes)

    def forward(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        encoder: Any = model
        logits = self.head(encoder.forward_features(batch["input"]))
        return {"loss": torch.nn.functional.cross_entropy(logits, batch["target"])}


def toy_kit(data_dir: Path | None = None, quick: bool = True) -> Any:
    """A kit for the engine's own study tests: pretraining sees 512 labelled blobs,
    fine-tuning few, with noisy inputs, so pretrained should beat scratch."""
    from polyfm.core.kit import DomainKit
    from polyfm.core.pretrain import Pretraining
    from polyfm.core.tasks import Classification, OptimConfig

    return DomainKit(
        name="toy",
        target="blobs",
        metric="test/acc",
        higher_is_better=True,
        make_encoder=lambda: ToyEncoder(width=16, depth=2),
        make_pretraining=lambda enc: Pretraining(enc, _Supervised(enc.feature_dim, 3), optim=OptimConfig(lr=1e-2)),
        make_pretrain_data=lambda: ToyDataModule(n_train=512, n_val=64, noise=2.0, batch_size=64),
        make_task=lambda enc, ad: Classification(enc, 3, adaptation=ad, optim=OptimConfig(lr=1e-2)),
        make_finetune_data=lambda fraction, seed: ToyDataModule(n_train=64, n_val=128, noise=2.0, label_fraction=fraction, seed=seed),
        pretrain_epochs=3,
        finetune_epochs=3,
        make_trunk_encoder=_toy_trunk,
    )


def _toy_trunk(architecture: dict[str, Any]) -> Encoder:
    """The toy vectors as a sequence of 8 one-channel steps, patched in pairs."""
    from polyfm.core.transfer import PatchTransformer

    class ToyTrunk(PatchTransformer):
        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward_features(x.unsqueeze(-1))

    return ToyTrunk(input_kind="series", in_channels=1, patch_size=2, max_tokens=8, **architecture)
