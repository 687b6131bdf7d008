"""The encoder contract every domain model implements.

An encoder turns a domain input (a waveform, a multispectral chip, a batch of
tokens, a window of a series, a volume) into features. The engine needs three
things from it, and nothing else:

* ``forward_features(x)``: pooled features ``(batch, feature_dim)`` for
  classification and regression heads (dense models return their dense map and
  say so with ``dense = True``);
* ``feature_dim``: the width of those features;
* ``block_names()``: the parameter-name prefixes of its blocks, ordered from
  input to output. Freeze-k, linear probing and layer-wise learning-rate decay
  are all computed from this one list, so a domain model never re-implements them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


class Encoder(nn.Module):
    """Base class (a mixin over ``nn.Module``) for domain encoders."""

    feature_dim: int
    #: True when ``forward_features`` returns a dense map rather than pooled features.
    dense: bool = False

    def forward_features(self, x: Any) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement forward_features(x)")

    def block_names(self) -> list[str]:
        """Parameter-name prefixes of the blocks, input first.

        The default treats every top-level child as one block, in registration
        order, which is right for most sequential trunks; models with a stem,
        repeated blocks and a final norm should list them explicitly.
        """
        return [name for name, child in self.named_children() if any(True for _ in child.parameters())]

    def block_index(self, parameter_name: str) -> int:
        """Index of the block that owns ``parameter_name`` (the last block if none matches)."""
        names = self.block_names()
        for index in range(len(names) - 1, -1, -1):
            prefix = names[index]
            if parameter_name == prefix or parameter_name.startswith(prefix + "."):
                return index
        return len(names) - 1

    def param_groups(
        self,
        lr: float,
        weight_decay: float = 0.0,
        layer_decay: float = 1.0,
        extra: Iterable[tuple[str, nn.Parameter]] = (),
    ) -> list[dict[str, Any]]:
        """Optimizer parameter groups with layer-wise learning-rate decay.

        Block ``i`` of ``n`` gets ``lr * layer_decay ** (n - i)``; the parameters in
        ``extra`` (a task head) get the full ``lr``. Biases and norm weights (1-D
        tensors) get no weight decay, as in BEiT/MAE fine-tuning recipes.
        """
        n_blocks = len(self.block_names())
        groups: dict[tuple[int, bool], dict[str, Any]] = {}

        def add(name: str, param: nn.Parameter, depth: int) -> None:
            if not param.requires_grad:
                return
            no_decay = param.ndim <= 1 or name.endswith(".bias")
            key = (depth, no_decay)
            if key not in groups:
                scale = layer_decay ** (n_blocks - depth)
                groups[key] = {
                    "params": [],
                    "names": [],
                    "lr": lr * scale,
                    "lr_scale": scale,
                    "weight_decay": 0.0 if no_decay else weight_decay,
                    "block": depth,
                }
            groups[key]["params"].append(param)
            groups[key]["names"].append(name)

        for name, param in self.named_parameters():
            add(name, param, self.block_index(name))
        for name, param in extra:
            add(name, param, n_blocks)
        return [groups[key] for key in sorted(groups)]


def as_encoder(module: nn.Module) -> Encoder:
    """Check that ``module`` honours the contract and return it typed as an Encoder."""
    missing = [attr for attr in ("forward_features", "feature_dim", "block_names") if not hasattr(module, attr)]
    if missing:
        raise TypeError(
            f"{type(module).__name__} is not a polyfm Encoder: it lacks {', '.join(missing)}. "
            "Subclass polyfm.core.Encoder and implement forward_features(x), feature_dim and block_names()."
        )
    return module  # type: ignore[return-value]
