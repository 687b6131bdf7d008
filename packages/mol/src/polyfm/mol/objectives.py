"""Pretraining objectives for molecules: callables ``objective(model, batch) -> {"loss", ...}``
for ``polyfm.core.pretrain.Pretraining``.

* :class:`MaskedLanguageModelling`: ChemBERTa / RoBERTa MLM (15% of tokens; 80% <mask>,
  10% random, 10% kept), cross-entropy on the chosen tokens through the tied LM head.
* :class:`MultiTaskRegression`: ChemBERTa-2 MTR: regress the standardised RDKit descriptors
  of ``batch["target"]`` from the <s> representation (NaN descriptors masked), through
  ChemBERTa-2's regression head (dense -> ReLU -> out_proj); ``pretrained`` takes a released
  head with its ``norm_mean``/``norm_std``.
* :class:`UniMolPretraining`: the Uni-Mol objective: mask 15% of atoms (with the official
  5% kept / 5% random split) and add uniform noise in [-1, 1] Angstrom to their
  coordinates, then predict the atom types (cross-entropy), the clean coordinates
  (smooth-L1, through ``pair2coord_proj``) and the clean pair distances (smooth-L1 on
  distances normalised with the paper's mean 6.31 / std 3.39, through ``dist_head``),
  with weights 1 / 5 / 10 and the two norm regularisers at 0.01 each.

Masking is drawn on the batch with the module's own generator, so the same batch on the
same step gets the same mask whatever the data loader does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from polyfm.mol.models.chemberta import ChemBERTa
    from polyfm.mol.models.unimol import UniMolDictionary


class MaskedLanguageModelling(nn.Module):
    """RoBERTa MLM over ``batch["input"] = {"input_ids", "attention_mask"}``.

    ``special_ids``: token ids never masked (<s>, </s>, <pad>...); ``mask_id`` and
    ``vocab_size`` from the tokenizer."""

    def __init__(
        self,
        mask_id: int,
        vocab_size: int,
        special_ids: list[int],
        mask_prob: float = 0.15,
        random_prob: float = 0.1,
        keep_prob: float = 0.1,
    ) -> None:
        super().__init__()
        self.mask_id, self.vocab_size, self.special_ids = mask_id, vocab_size, list(special_ids)
        self.mask_prob, self.random_prob, self.keep_prob = mask_prob, random_prob, keep_prob

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> MaskedLanguageModelling:
        return cls(tokenizer.mask_token_id, len(tokenizer), list(tokenizer.all_special_ids), **kwargs)

    def mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        special = torch.isin(input_ids, torch.tensor(self.special_ids, device=input_ids.device))
        if attention_mask is not None:
            special |= attention_mask == 0
        chosen = (torch.rand(input_ids.shape, device=input_ids.device) < self.mask_prob) & ~special
        # at least one token per sequence, so short molecules still give a loss
        none = ~chosen.any(dim=1) & (~special).any(dim=1)
        if none.any():
            scores = torch.rand(input_ids.shape, device=input_ids.device).masked_fill(special, -1.0)
            chosen[none, scores[none].argmax(dim=1)] = True
        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
        roll = torch.rand(input_ids.shape, device=input_ids.device)
        corrupted = input_ids.clone()
        corrupted[chosen & (roll < 1 - self.random_prob - self.keep_prob)] = self.mask_id
        random_positions = chosen & (roll >= 1 - self.random_prob - self.keep_prob) & (roll < 1 - self.keep_prob)
        corrupted[random_positions] = torch.randint(self.vocab_size, (int(random_positions.sum()),), device=input_ids.device)
        return corrupted, labels

    def __call__(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:  # the Objective protocol, for LightningCLI
        out: dict[str, torch.Tensor] = super().__call__(model, batch)
        return out

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        inputs = batch["input"]
        corrupted, labels = self.mask(inputs["input_ids"], inputs.get("attention_mask"))
        logits = model(corrupted, inputs.get("attention_mask"))["logits"]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        with torch.no_grad():
            hit = (logits.argmax(-1) == labels)[labels != -100].float().mean()
        return {"loss": loss, "masked_acc": hit}


class MultiTaskRegression(nn.Module):
    """ChemBERTa-2 MTR: a regression head on the <s> token, laid out as ChemBERTa-2's
    ``RobertaForRegression`` (bert-loves-chemistry ``chemberta/utils/roberta_regression.py``):
    dropout -> ``regression.dense`` -> ReLU -> dropout -> ``regression.out_proj``, so a released
    MTR checkpoint's ``regression.*`` tensors load into it key for key. Masked MSE against the
    standardised descriptors in ``batch["target"]``.

    ``pretrained`` (``chemberta-2-77m-mtr`` or a hub folder) loads the released head and its
    ``norm_mean``/``norm_std`` (buffers of the same names) and ``descriptor_names``;
    :meth:`predict_descriptors` then de-normalises as upstream's inference does. Pair it with
    ``MoleculePretrainDataModule(descriptors_from=<the same>)`` so the targets are that head's."""

    norm_mean: torch.Tensor | None
    norm_std: torch.Tensor | None

    def __init__(self, hidden_size: int, num_targets: int, dropout: float = 0.1, pretrained: str | None = None) -> None:
        super().__init__()
        self.regression = nn.ModuleDict(
            {
                "dense": nn.Linear(hidden_size, hidden_size),
                "dropout": nn.Dropout(dropout),
                "out_proj": nn.Linear(hidden_size, num_targets),
            }
        )
        # absent from the state dict until a released head sets them, so our checkpoints keep their keys
        self.register_buffer("norm_mean", None)
        self.register_buffer("norm_std", None)
        self.descriptor_names: list[str] | None = None
        if pretrained:  # so a YAML recipe can continue from the released head
            self.load_pretrained(pretrained)

    def load_pretrained(self, source: str) -> MultiTaskRegression:
        """The ``regression.*`` head and label normalisation of a released MTR checkpoint."""
        from polyfm.core.errors import CheckpointError
        from polyfm.mol.descriptors import load_released_state, released_folder, released_normalisation

        folder = released_folder(source)
        norm = released_normalisation(folder)
        head = {k[len("regression.") :]: v for k, v in load_released_state(folder).items() if k.startswith("regression.")}
        if not head:
            raise CheckpointError(f"{source} has no regression.* head: not a ChemBERTa-2 MTR checkpoint.")
        ours = self.regression.state_dict()
        wrong = [k for k in ours if k not in head or head[k].shape != ours[k].shape]
        if wrong and not {"dense.weight", "out_proj.weight"} <= set(head):
            raise CheckpointError(f"{source}: regression head without {', '.join(wrong)}; not RobertaForRegression's layout.")
        if wrong:
            hidden, outputs = head["dense.weight"].shape[1], head["out_proj.weight"].shape[0]
            raise CheckpointError(
                f"{source}'s regression head has hidden_size {hidden} and {outputs} outputs; this MultiTaskRegression "
                f"has hidden_size {ours['dense.weight'].shape[1]}, num_targets {ours['out_proj.weight'].shape[0]}. "
                f"Pass hidden_size: {hidden}, num_targets: {outputs}."
            )
        if len(norm.names) != ours["out_proj.weight"].shape[0]:
            raise CheckpointError(f"{source}: {len(norm.names)} norm_mean values for {ours['out_proj.weight'].shape[0]} outputs.")
        self.regression.load_state_dict(head, strict=True)
        device = next(self.regression.parameters()).device
        self.norm_mean = torch.tensor(norm.mean, dtype=torch.float32, device=device)
        self.norm_std = torch.tensor(norm.std, dtype=torch.float32, device=device)
        self.descriptor_names = list(norm.names)
        return self

    def predict(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        # a ChemBERTa (or any model with its hidden_states); nn.Module's stubs type attributes as Tensor | Module
        cls = cast("ChemBERTa", model).hidden_states(inputs)[:, 0]
        head = self.regression
        out: torch.Tensor = head["out_proj"](head["dropout"](F.relu(head["dense"](head["dropout"](cls)))))
        return out

    def predict_descriptors(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The head's outputs in descriptor units (``pred * norm_std + norm_mean``, what upstream's
        ``RobertaForRegression`` returns without labels); needs a released head's normalisation."""
        if self.norm_mean is None or self.norm_std is None:
            raise ValueError(
                "this MultiTaskRegression has no norm_mean/norm_std: its outputs are standardised targets of the data "
                "module's scaler. Build it with pretrained=<an MTR checkpoint> to predict in descriptor units."
            )
        out: torch.Tensor = self.predict(model, inputs) * self.norm_std + self.norm_mean
        return out

    def __call__(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:  # the Objective protocol, for LightningCLI
        out: dict[str, torch.Tensor] = super().__call__(model, batch)
        return out

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        pred = self.predict(model, batch["input"])
        target = batch["target"].to(pred.dtype)
        observed = ~torch.isnan(target)
        error = (pred - torch.nan_to_num(target)).pow(2) * observed
        return {"loss": error.sum() / observed.sum().clamp(min=1)}


class UniMolPretraining(nn.Module):
    """Masked atoms + coordinate denoising + distance prediction (Zhou et al. 2023).

    ``batch["input"]`` holds clean Uni-Mol inputs (padded). Defaults are the official
    pretraining flags: mask 0.15, leave-unmasked 0.05, random-token 0.05, uniform noise 1.0 A,
    loss weights token 1, coord 5, distance 10, x-norm 0.01, delta-pair-norm 0.01."""

    dist_mean = 6.312581655060595
    dist_std = 3.3899264663911888

    def __init__(
        self,
        mask_prob: float = 0.15,
        leave_unmasked_prob: float = 0.05,
        random_token_prob: float = 0.05,
        noise: float = 1.0,
        noise_type: str = "uniform",
        token_weight: float = 1.0,
        coord_weight: float = 5.0,
        distance_weight: float = 10.0,
        x_norm_weight: float = 0.01,
        delta_pair_norm_weight: float = 0.01,
    ) -> None:
        super().__init__()
        if noise_type not in ("uniform", "normal", "trunc_normal", "none"):
            raise ValueError(f"noise_type must be uniform, normal, trunc_normal or none, got {noise_type!r}")
        self.mask_prob, self.leave_unmasked_prob, self.random_token_prob = mask_prob, leave_unmasked_prob, random_token_prob
        self.noise, self.noise_type = noise, noise_type
        self.weights = {
            "token": token_weight,
            "coord": coord_weight,
            "distance": distance_weight,
            "x_norm": x_norm_weight,
            "delta_pair_norm": delta_pair_norm_weight,
        }

    def _noise(self, count: int, device: torch.device) -> torch.Tensor:
        if self.noise_type == "uniform":
            return (torch.rand(count, 3, device=device) * 2 - 1) * self.noise
        if self.noise_type == "normal":
            return torch.randn(count, 3, device=device) * self.noise
        if self.noise_type == "trunc_normal":
            return (torch.randn(count, 3, device=device) * self.noise).clamp(-2 * self.noise, 2 * self.noise)
        return torch.zeros(count, 3, device=device)

    def corrupt(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Noisy inputs and the boolean mask of the atoms whose type is to be predicted."""
        dictionary = cast("UniMolDictionary", model.dictionary)  # a plain attribute, not the Tensor | Module of the stubs
        tokens, coord = inputs["src_tokens"], inputs["src_coord"]
        atoms = ~torch.isin(tokens, torch.tensor([dictionary.pad, dictionary.bos, dictionary.eos], device=tokens.device))
        sizes = atoms.sum(dim=1)
        # per molecule, int(mask_prob * n + U[0,1)) atoms, as the official dataset draws them
        counts = (self.mask_prob * sizes.float() + torch.rand(len(sizes), device=tokens.device)).long().clamp(min=1)
        scores = torch.rand(tokens.shape, device=tokens.device).masked_fill(~atoms, -1.0)
        ranks = scores.argsort(dim=1, descending=True).argsort(dim=1)
        target_mask = (ranks < counts[:, None]) & atoms
        roll = torch.rand(tokens.shape, device=tokens.device)
        keep = target_mask & (roll < self.leave_unmasked_prob)
        random = target_mask & (roll >= self.leave_unmasked_prob) & (roll < self.leave_unmasked_prob + self.random_token_prob)
        replaced = target_mask & ~keep  # [MASK] or random token; their coordinates get noise
        new_tokens = tokens.clone()
        new_tokens[replaced] = dictionary.mask
        candidates = torch.tensor(
            [i for i in range(len(dictionary)) if i not in set(dictionary.special_indices())], device=tokens.device
        )
        if random.any():
            new_tokens[random] = candidates[torch.randint(len(candidates), (int(random.sum()),), device=tokens.device)]
        new_coord = coord.clone()
        new_coord[replaced] = new_coord[replaced] + self._noise(int(replaced.sum()), coord.device).to(coord.dtype)
        distance = torch.cdist(new_coord, new_coord)
        pad = ~(atoms | tokens.eq(dictionary.bos) | tokens.eq(dictionary.eos))
        distance = distance.masked_fill(pad[:, None, :] | pad[:, :, None], 0.0)
        from polyfm.mol.models.unimol import edge_types

        noisy = {
            "src_tokens": new_tokens,
            "src_coord": new_coord,
            "src_distance": distance,
            "src_edge_type": edge_types(new_tokens, len(dictionary)),
        }
        return noisy, target_mask

    def __call__(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:  # the Objective protocol, for LightningCLI
        out: dict[str, torch.Tensor] = super().__call__(model, batch)
        return out

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        clean = batch["input"]
        noisy, target_mask = self.corrupt(model, clean)
        out = model(
            noisy["src_tokens"],
            noisy["src_distance"],
            noisy["src_coord"],
            noisy["src_edge_type"],
            masked_tokens=target_mask,
            features_only=False,
        )
        token_target = clean["src_tokens"][target_mask]
        token_loss = F.cross_entropy(out["logits"].float(), token_target)
        coord_loss = F.smooth_l1_loss(out["coord"][target_mask].float(), clean["src_coord"][target_mask].float(), beta=1.0)
        predicted = out["distance"][target_mask]
        true = clean["src_distance"][target_mask]
        valid = true > 0
        distance_loss = F.smooth_l1_loss(
            predicted[valid].float(), ((true[valid] - self.dist_mean) / self.dist_std).float(), beta=1.0
        )
        w = self.weights
        loss = w["token"] * token_loss + w["coord"] * coord_loss + w["distance"] * distance_loss
        loss = loss + w["x_norm"] * out["x_norm"] + w["delta_pair_norm"] * out["delta_pair_norm"]
        with torch.no_grad():
            acc = (out["logits"].argmax(-1) == token_target).float().mean()
        return {
            "loss": loss,
            "token_loss": token_loss.detach(),
            "coord_loss": coord_loss.detach(),
            "distance_loss": distance_loss.detach(),
            "masked_acc": acc,
        }
