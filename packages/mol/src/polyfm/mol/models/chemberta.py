"""ChemBERTa (Chithrananda et al. 2020) and ChemBERTa-2 (Ahmad et al. 2022): RoBERTa on SMILES.

The trunk and the masked-LM head are transformers' own ``RobertaModel`` and
``RobertaLMHead``, held under the names ``roberta`` and ``lm_head`` so the hub
checkpoints (``RobertaForMaskedLM``) load key for key. The output embedding is tied to
the input embedding as in ``RobertaForMaskedLM``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import RobertaConfig, RobertaModel
from transformers.models.roberta.modeling_roberta import RobertaLMHead

from polyfm.core.encoder import Encoder
from polyfm.core.errors import CheckpointError, DataError
from polyfm.core.weights import PretrainedMixin, WeightSpec, load_checkpoint_file, load_state_dict_checked, unwrap_state_dict

# keys some hub checkpoints carry that the model recomputes or does not use
_IGNORED_UNEXPECTED = (
    "roberta.embeddings.position_ids",
    "roberta.pooler.",
    "regression.",
    "classifier.",
    "norm_mean",
    "norm_std",
)
_TIED = ("lm_head.decoder.weight", "lm_head.decoder.bias")
# what a checkpoint's config.json must agree on with the model it is loaded into
_ARCHITECTURE = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings",
    "layer_norm_eps", "pad_token_id", "type_vocab_size", "hidden_act",
)  # fmt: skip


class ChemBERTa(Encoder, PretrainedMixin):
    """RoBERTa over SMILES tokens. Defaults are ChemBERTa-2 77M's configuration.

    ``forward(input_ids, attention_mask)`` returns ``{"logits", "last_hidden_state"}``
    (the masked-LM logits and the trunk's output, as ``RobertaForMaskedLM`` computes them);
    ``forward_features({"input_ids", "attention_mask"})`` pools the last hidden state:
    ``pooling="cls"`` takes ``<s>`` (what ``RobertaForSequenceClassification`` reads),
    ``"mean"`` averages the non-padding tokens. ``pretrained`` (a registered name or hub
    folder) loads released weights into the model built from these arguments.
    """

    def __init__(
        self,
        vocab_size: int = 600,
        hidden_size: int = 384,
        num_hidden_layers: int = 3,
        num_attention_heads: int = 12,
        intermediate_size: int = 464,
        max_position_embeddings: int = 515,
        hidden_dropout_prob: float = 0.144,
        attention_probs_dropout_prob: float = 0.109,
        layer_norm_eps: float = 1e-12,
        pad_token_id: int = 1,
        bos_token_id: int = 0,
        eos_token_id: int = 2,
        type_vocab_size: int = 1,
        hidden_act: str = "gelu",
        pooling: str = "cls",
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.config = RobertaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings,
            hidden_dropout_prob=hidden_dropout_prob,
            attention_probs_dropout_prob=attention_probs_dropout_prob,
            layer_norm_eps=layer_norm_eps,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            type_vocab_size=type_vocab_size,
            hidden_act=hidden_act,
        )
        self.feature_dim = hidden_size
        self.pooling = pooling
        self.roberta = RobertaModel(self.config, add_pooling_layer=False)
        self.lm_head = RobertaLMHead(self.config)  # type: ignore[no-untyped-call]  # transformers leaves its __init__ unannotated
        self.tie_weights()
        if pretrained:  # so a YAML recipe can start from a released checkpoint
            self.load_pretrained(pretrained)

    def load_pretrained(self, name_or_path: str) -> ChemBERTa:
        """Load a registered checkpoint (``chemberta-2-77m-mlm``) or hub folder into this model.
        Its ``config.json`` must describe this architecture; dropouts and pooling stay this model's.
        A ``.ckpt`` of ours (pretraining or fine-tuning) loads its encoder, of this architecture."""
        from polyfm.mol.weights import check_architecture, encoder_state_from_lightning

        if str(name_or_path).endswith(".ckpt"):
            load_state_dict_checked(self, encoder_state_from_lightning(name_or_path), source=str(name_or_path))
            self.tie_weights()
            return self
        source = type(self).from_pretrained(name_or_path)
        shape = {k: getattr(source.config, k) for k in _ARCHITECTURE}
        check_architecture(name_or_path, "ChemBERTa", shape, {k: getattr(self.config, k) for k in _ARCHITECTURE})
        self.load_state_dict(source.state_dict())
        self.tie_weights()
        return self

    def tie_weights(self) -> None:
        self.lm_head.decoder.weight = self.roberta.embeddings.word_embeddings.weight
        self.lm_head.decoder.bias = self.lm_head.bias

    @property
    def max_tokens(self) -> int:
        """Longest input (RoBERTa's positions start after the padding index)."""
        return self.config.max_position_embeddings - int(self.config.pad_token_id or 0) - 1  # always set by __init__

    def block_names(self) -> list[str]:
        layers = [f"roberta.encoder.layer.{i}" for i in range(self.config.num_hidden_layers)]
        return ["roberta.embeddings", *layers, "lm_head"]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": input_ids} if attention_mask is None else {"input_ids": input_ids, "attention_mask": attention_mask}
        hidden = self.hidden_states(inputs)
        return {"logits": self.lm_head(hidden), "last_hidden_state": hidden}

    def hidden_states(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        input_ids = x["input_ids"]
        if input_ids.shape[-1] > self.max_tokens:  # a shape check: no host sync
            # past the last position embedding RoBERTa fails with a bare index error
            raise DataError(
                f"inputs of {input_ids.shape[-1]} tokens, but this ChemBERTa has position embeddings for {self.max_tokens} "
                f"(max_position_embeddings {self.config.max_position_embeddings} - pad_token_id - 1). "
                f"Tokenize with max_length={self.max_tokens} or less (longer SMILES are then truncated and counted)."
            )
        out: torch.Tensor = self.roberta(input_ids=input_ids, attention_mask=x.get("attention_mask"), return_dict=True).last_hidden_state
        return out

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.pooling == "cls" or attention_mask is None:
            return hidden[:, 0]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def forward_features(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.pool(self.hidden_states(x), x.get("attention_mask"))

    # -- checkpoints ------------------------------------------------------------------

    @classmethod
    def config_from_json(cls, path: Path) -> dict[str, Any]:
        """Constructor arguments from a hub ``config.json``."""
        raw = json.loads(path.read_text())
        names = (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings",
            "hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id",
            "type_vocab_size", "hidden_act",
        )  # fmt: skip
        if raw.get("model_type", "roberta") != "roberta":
            raise CheckpointError(f"{path} describes a {raw.get('model_type')!r} model; ChemBERTa checkpoints are RoBERTa.")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(
                f"{path}: position_embedding_type {raw['position_embedding_type']!r} is not supported (absolute only)."
            )
        return {k: raw[k] for k in names if k in raw}

    @classmethod
    def _from_checkpoint(cls, path: Path, spec: WeightSpec | None, **config: Any) -> ChemBERTa:
        """``path``: a hub folder (config.json + model.safetensors or pytorch_model.bin), or a
        weights file next to its config.json."""
        folder = path if path.is_dir() else path.parent
        config_file = folder / "config.json"
        if not config_file.exists():
            raise CheckpointError(f"{folder} has no config.json; ChemBERTa needs the hub folder layout (config.json + weights).")
        arguments = {**cls.config_from_json(config_file), **config}
        if path.is_dir():
            weights = next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).exists()), None)
            if weights is None:
                raise CheckpointError(f"{folder} has neither model.safetensors nor pytorch_model.bin.")
        else:
            weights = path
        state = unwrap_state_dict(load_checkpoint_file(weights))
        # checkpoints saved from a bare RobertaModel have no "roberta." prefix
        if not any(k.startswith("roberta.") for k in state) and any(k.startswith("embeddings.") for k in state):
            state = {f"roberta.{k}": v for k, v in state.items()}
        model = cls(**arguments)
        diff = load_state_dict_checked(model, state, strict=False, ignore_unexpected=_IGNORED_UNEXPECTED, source=str(weights), warn=False)  # judged below
        missing = [k for k in diff.missing if k not in _TIED]
        trunk_missing = [k for k in missing if k.startswith("roberta.")]
        if trunk_missing or diff.unexpected:
            raise CheckpointError(f"{weights} does not fit ChemBERTa:\n{diff.report()}")
        if missing:  # an MTR or classification checkpoint: the trunk loads, the LM head is fresh
            warnings.warn(
                f"{weights}: no masked-LM head in the checkpoint ({len(missing)} keys); lm_head is freshly initialised.",
                stacklevel=2,
            )
        model.tie_weights()
        return model


def extra_heads(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameters of a checkpoint beyond the trunk and LM head (e.g. ChemBERTa-2 MTR's ``regression.*``)."""
    return {k: v for k, v in state.items() if k.startswith(("regression.", "classifier."))}


__all__ = ["ChemBERTa", "extra_heads"]
