"""How a pretrained encoder is adapted: full, linear probe, freeze-k, LoRA; and model soups.

Everything here works from the encoder contract (``block_names``) and PEFT, so a
domain model gets every mode for free.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from polyfm.core.errors import ConfigError

log = logging.getLogger(__name__)

AdaptationMode = Literal["full", "linear", "freeze", "lora"]
_LORA_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class Adaptation:
    """What to train in the encoder during fine-tuning.

    * ``full``: everything, optionally with layer-wise LR decay (``layer_decay`` < 1);
    * ``linear``: nothing in the encoder (a linear probe: only the task head learns;
      BatchNorm statistics stay frozen too);
    * ``freeze``: the first ``freeze_blocks`` blocks of ``encoder.block_names()``;
    * ``lora``: low-rank adapters (PEFT) on ``lora_targets`` (regexes over module
      names; default every Linear and Conv layer), the base weights frozen.
    """

    mode: AdaptationMode = "full"
    freeze_blocks: int = 0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None
    layer_decay: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in ("full", "linear", "freeze", "lora"):
            raise ConfigError(f"Unknown adaptation mode {self.mode!r}: use one of full, linear, freeze, lora.")
        if self.mode == "freeze" and self.freeze_blocks < 0:
            raise ConfigError(f"freeze_blocks must be >= 0, got {self.freeze_blocks}.")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"layer_decay must be in (0, 1], got {self.layer_decay}.")

    @property
    def label(self) -> str:
        return {"freeze": f"freeze{self.freeze_blocks}", "lora": f"lora{self.lora_rank}"}.get(self.mode, self.mode)


def lora_target_names(module: nn.Module, patterns: Sequence[str] | None = None) -> list[str]:
    """Names of the Linear/Conv layers LoRA will wrap."""
    parents = dict(module.named_modules())
    names = []
    for name, child in module.named_modules():
        if not name or not isinstance(child, _LORA_LAYER_TYPES):
            continue
        parent = parents.get(name.rpartition(".")[0])
        if isinstance(parent, nn.MultiheadAttention):  # MHA reads out_proj.weight directly; an adapter there would be ignored
            continue
        if patterns is None or any(re.search(p, name) for p in patterns):
            names.append(name)
    # PEFT refuses a grouped (depthwise) convolution unless the rank divides its groups, nor can it merge one;
    # they stay frozen without adapters, said once
    grouped = [n for n in names if getattr(parents[n], "groups", 1) > 1]
    if grouped:
        log.info("LoRA: %d grouped (depthwise) convolutions stay frozen without adapters (%s, ...); the other layers get them.",
                 len(grouped), ", ".join(grouped[:3]))  # fmt: skip
    return [n for n in names if n not in set(grouped)]


def head_prefixes(module: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of a whole model's own output head (``head_names()``), for
    models that carry their head (segmentation U-Nets, forecasters): the head always trains."""
    names = getattr(module, "head_names", None)
    return tuple(names()) if callable(names) else ()


def _is_under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def apply_adaptation(encoder: nn.Module, adaptation: Adaptation) -> nn.Module:
    """Freeze or wrap ``encoder`` in place according to ``adaptation``; returns it.

    A model that declares ``head_names()`` keeps those parameters trainable in every
    mode, and LoRA leaves them unwrapped (a fresh head has nothing to adapt)."""
    head = head_prefixes(encoder)
    if adaptation.mode == "full":
        encoder.requires_grad_(True)
    elif adaptation.mode == "linear":
        encoder.requires_grad_(False)
    elif adaptation.mode == "freeze":
        block_names = getattr(encoder, "block_names", None)
        if block_names is None:
            raise ConfigError(f"{type(encoder).__name__} has no block_names(): freeze-k needs the Encoder contract.")
        blocks = block_names()
        if adaptation.freeze_blocks > len(blocks):
            raise ConfigError(f"freeze_blocks={adaptation.freeze_blocks} but {type(encoder).__name__} has {len(blocks)} blocks: {blocks}")
        frozen = tuple(blocks[: adaptation.freeze_blocks])
        for name, param in encoder.named_parameters():
            param.requires_grad_(not any(name == p or name.startswith(p + ".") for p in frozen))
    elif adaptation.mode == "lora":
        _inject_lora(encoder, adaptation, exclude=head)
    for name, param in encoder.named_parameters():
        if head and _is_under(name, head):
            param.requires_grad_(True)
    return encoder


def _inject_lora(encoder: nn.Module, adaptation: Adaptation, exclude: tuple[str, ...] = ()) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    targets = [t for t in lora_target_names(encoder, adaptation.lora_targets) if not _is_under(t, exclude)]
    if not targets:
        raise ConfigError(
            f"LoRA found no Linear/Conv layer in {type(encoder).__name__} matching {adaptation.lora_targets}; "
            f"available: {lora_target_names(encoder)[:20]}"
        )
    config = LoraConfig(
        r=adaptation.lora_rank,
        lora_alpha=adaptation.lora_alpha,  # type: ignore[arg-type]  # PEFT accepts floats; its stub says int
        lora_dropout=adaptation.lora_dropout,
        target_modules=_regex_union(targets),  # a string is matched in full against module names
        bias="none",
    )
    inject_adapter_in_model(config, encoder)
    for name, param in encoder.named_parameters():
        param.requires_grad_("lora_" in name)


def _regex_union(names: list[str]) -> str:
    return "|".join(re.escape(n) for n in names)


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold LoRA adapters into their base layers and remove the wrappers (in place)."""
    from peft.tuners.lora import LoraLayer

    for name, child in list(module.named_modules()):
        if isinstance(child, LoraLayer):
            child.merge()
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, child.get_base_layer())
    return module


def freeze_batchnorm_statistics(module: nn.Module) -> None:
    """Put norm layers whose parameters are all frozen in eval mode, so their running stats stay put."""
    for child in module.modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm | nn.modules.instancenorm._InstanceNorm):
            params = list(child.parameters(recurse=False))
            if child.training and (not params or not any(p.requires_grad for p in params)):
                child.eval()


# ----------------------------------------------------------------------------- soups


def average_state_dicts(state_dicts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Uniform average of floating-point entries; integer buffers (step counters) come from the first."""
    if not state_dicts:
        raise ConfigError("A soup needs at least one model.")
    keys = set(state_dicts[0])
    for index, sd in enumerate(state_dicts[1:], start=1):
        if set(sd) != keys:
            raise ConfigError(f"Soup ingredient {index} has different keys: {sorted(set(sd) ^ keys)[:10]}")
    averaged = {}
    for key, first in state_dicts[0].items():
        if first.is_floating_point():
            averaged[key] = torch.stack([sd[key].float() for sd in state_dicts]).mean(0).to(first.dtype)
        else:
            averaged[key] = first.clone()
    return averaged


def uniform_soup(models: Sequence[nn.Module]) -> nn.Module:
    """A new model whose weights are the mean of ``models``' (same architecture)."""
    soup = copy.deepcopy(models[0])
    soup.load_state_dict(average_state_dicts([m.state_dict() for m in models]))
    return soup


def greedy_soup(
    models: Sequence[nn.Module],
    score: Callable[[nn.Module], float],
    higher_is_better: bool = True,
) -> tuple[nn.Module, list[int]]:
    """Greedy soup (Wortsman et al. 2022): rank by validation score, add an ingredient
    only when the soup's score does not get worse. Returns the soup and the chosen indices.
    The result scores at least as well as the best single model on ``score``."""
    sign = 1.0 if higher_is_better else -1.0
    scored = sorted(((sign * score(m), i) for i, m in enumerate(models)), reverse=True)
    best_value, best_index = scored[0]
    chosen = [best_index]
    soup = copy.deepcopy(models[best_index])
    for _, index in scored[1:]:
        candidate = uniform_soup([models[i] for i in [*chosen, index]])
        value = sign * score(candidate)
        if value >= best_value:
            best_value, soup = value, candidate
            chosen.append(index)
    return soup, chosen
