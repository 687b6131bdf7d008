"""Benchmarks against the reference implementations, same configuration, same process:

* ``mol/conformers/etkdg``: ETKDG + MMFF conformers per second (ours vs unimol_tools'
  ``inner_smi2coords``, one process each, same seed);
* ``mol/chemberta-77m/inference``: ChemBERTa-2 77M masked-LM forward, tokens/s (ours vs
  transformers' ``RobertaForMaskedLM`` holding the same weights);
* ``mol/chemberta-77m/mlm-train``: ChemBERTa-2 77M masked-LM training step, tokens/s
  (ours vs transformers' ``RobertaForMaskedLM`` with its own loss);
* ``mol/unimol/forward``: Uni-Mol (molecule architecture, 15 x 512) forward, molecules/s
  (ours vs unimol_tools' ``UniMolModel`` loaded from the same random checkpoint);
* ``mol/unimol/train``: a regression fine-tuning step on the same molecules, MSE loss
  (polyfm's ``Regression`` task on our Uni-Mol vs ``UniMolModel`` with its linear head).

Training steps are AdamW steps (lr 1e-4) with dropout on, on both sides.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from polyfm.core.bench import BenchCase, scratch_dir

if TYPE_CHECKING:
    from polyfm.mol.models.unimol import UniMol

Step = Callable[[], object]

SMILES = (
    "CC(=O)Oc1ccccc1C(=O)O", "CN1CCC[C@H]1c1cccnc1", "CC(C)Cc1ccc(C(C)C(=O)O)cc1", "O=C(O)c1ccccc1O", "CCN(CC)CCOC(=O)c1ccc(N)cc1",
    "COc1ccc2[nH]cc(CCNC(C)=O)c2c1", "CC1=C(C(=O)OC)C(c2ccccc2[N+](=O)[O-])C(C(=O)OC)=C1C", "Clc1ccc(C(c2ccccc2)n2ccnc2)cc1",
    "CC(C)NCC(O)c1ccc(O)c(O)c1", "OC(c1ccccc1)(c1ccccc1)C1CCNCC1", "CN1C(=O)CN=C(c2ccccc2)c2cc(Cl)ccc21", "Nc1ccc(S(=O)(=O)Nc2ccccn2)cc1",
    "CC(=O)Nc1ccc(O)cc1", "c1ccc2c(c1)ccc1ccccc12", "OCC1OC(O)C(O)C(O)C1O", "CCCCCCCCCCCCCCCC(=O)O",
)  # fmt: skip


def inference_step(module: nn.Module, forward: Callable[[], object]) -> Step:
    """``forward()`` in inference mode, ``module`` in eval mode."""
    module.eval()

    def step() -> object:
        with torch.inference_mode():
            return forward()

    return step


def train_step(module: nn.Module, loss: Callable[[], torch.Tensor]) -> Step:
    """One AdamW step on ``loss()`` (``module`` in train mode); returns the loss."""
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        value = loss()
        torch.autograd.backward(value)  # what value.backward() calls; Tensor.backward is unannotated
        optimizer.step()
        return value.detach()

    return step


def _conformer_case(quick: bool) -> BenchCase:
    smiles = SMILES[:8] if quick else SMILES

    def ours(device: torch.device) -> Step:
        from polyfm.mol.conformers import ConformerSettings, embed_smiles

        settings = ConformerSettings(seed=42, remove_hs=False, mmff=True)
        return lambda: [embed_smiles(s, settings) for s in smiles]

    def reference(device: torch.device) -> Step:
        from unimol_tools.data.conformer import inner_smi2coords

        return lambda: [inner_smi2coords(s, seed=42, mode="fast", remove_hs=False) for s in smiles]

    return BenchCase(
        "mol/conformers/etkdg", "molecules", len(smiles), ours, reference, reference_name="unimol_tools inner_smi2coords"
    )


CHEMBERTA_77M: dict[str, Any] = {
    "vocab_size": 600,
    "hidden_size": 384,
    "num_hidden_layers": 3,
    "num_attention_heads": 12,
    "intermediate_size": 464,
    "max_position_embeddings": 515,
}


def _tokens(batch: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 590, (batch, length), generator=generator)
    ids[:, 0], ids[:, -1] = 0, 2
    return ids.to(device), torch.ones_like(ids).to(device)


def _chemberta_pair(device: torch.device) -> tuple[nn.Module, nn.Module]:
    """Our ChemBERTa and transformers' ``RobertaForMaskedLM`` with the same weights."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    from polyfm.mol.models.chemberta import ChemBERTa

    torch.manual_seed(0)
    ours = ChemBERTa(**CHEMBERTA_77M)
    reference = RobertaForMaskedLM(RobertaConfig(**CHEMBERTA_77M, type_vocab_size=1, pad_token_id=1))
    reference.load_state_dict(ours.state_dict())  # key for key (neither has a pooler)
    return ours.to(device), reference.to(device)  # type: ignore[arg-type]  # transformers types its wrapped .to() as taking the model


def _chemberta_cases(quick: bool) -> list[BenchCase]:
    batch, length = (8, 48) if quick else (64, 96)

    def infer(reference: bool) -> Callable[[torch.device], Step]:
        def make(device: torch.device) -> Step:
            model = _chemberta_pair(device)[int(reference)]
            ids, mask = _tokens(batch, length, device)
            if reference:
                return inference_step(model, lambda: model(input_ids=ids, attention_mask=mask).logits)
            return inference_step(model, lambda: model(ids, mask)["logits"])

        return make

    def train_ours(device: torch.device) -> Step:
        from polyfm.mol.objectives import MaskedLanguageModelling

        model = _chemberta_pair(device)[0]
        objective = MaskedLanguageModelling(mask_id=4, vocab_size=600, special_ids=[0, 1, 2, 3, 4])
        ids, mask = _tokens(batch, length, device)
        example = {"input": {"input_ids": ids, "attention_mask": mask}}
        return train_step(model, lambda: objective(model, example)["loss"])

    def train_reference(device: torch.device) -> Step:
        model = _chemberta_pair(device)[1]
        ids, mask = _tokens(batch, length, device)
        labels = torch.where(torch.rand(ids.shape, device=device) < 0.15, ids, torch.full_like(ids, -100))
        return train_step(model, lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss)

    name, reference_name = "mol/chemberta-77m", "transformers RobertaForMaskedLM"
    return [
        BenchCase(f"{name}/inference", "tokens", batch * length, infer(False), infer(True), reference_name=reference_name),
        BenchCase(f"{name}/mlm-train", "tokens", batch * length, train_ours, train_reference, reference_name=reference_name),
    ]


def _unimol_batch(dictionary: Any, count: int) -> dict[str, torch.Tensor]:
    from polyfm.mol.conformers import ConformerSettings, collate_unimol, embed_smiles, unimol_features

    settings = ConformerSettings(seed=42, remove_hs=False, mmff=False)
    features = []
    for s in (SMILES * 4)[:count]:
        conformer = embed_smiles(s, settings)
        features.append(unimol_features(conformer.atoms, conformer.coordinates, dictionary))
    return collate_unimol(features, dictionary.pad)


def _unimol_checkpoint(count: int) -> tuple[Path, list[str], dict[str, torch.Tensor]]:
    """A random Uni-Mol (molecule architecture) on unimol_tools' symbol order, saved where both
    sides load it from, and the batch of ``count`` molecules."""
    from polyfm.mol.models.unimol import OFFICIAL_MOL_SYMBOLS, UniMol, UniMolDictionary

    folder = scratch_dir("polyfm-bench-unimol-")
    UniMolDictionary(OFFICIAL_MOL_SYMBOLS).write(folder / "dict.txt")
    # unimol_tools numbers its specials [CLS],[UNK],[PAD],[SEP] first
    order = ["[CLS]", "[UNK]", "[PAD]", "[SEP]", *[s for s in OFFICIAL_MOL_SYMBOLS if not s.startswith("[")]]
    torch.manual_seed(0)
    model = UniMol(dictionary=order, pretraining_heads=False, final_head_layer_norm=False)
    torch.save({"model": model.official_state_dict()}, folder / "mol_pre_all_h_220816.pt")
    return folder / "mol_pre_all_h_220816.pt", order, _unimol_batch(model.dictionary, count)


def _unimol_cases(quick: bool) -> list[BenchCase]:
    count = 4 if quick else 32
    # built here, before either side is measured, so neither side's memory counts it
    checkpoint, order, molecules = _unimol_checkpoint(count)

    def inputs(device: torch.device) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in molecules.items()}

    def reference_model(device: torch.device) -> nn.Module:
        from unimol_tools.models.unimol import UniMolModel

        model: nn.Module = UniMolModel(
            output_dim=1,
            data_type="molecule",
            pretrained_model_path=str(checkpoint),
            pretrained_dict_path=str(checkpoint.parent / "dict.txt"),
        ).to(device)
        return model

    def our_model(device: torch.device) -> UniMol:
        from polyfm.mol.models.unimol import UniMol

        return UniMol.from_pretrained(checkpoint, dictionary=order).to(device)

    def forward_ours(device: torch.device) -> Step:
        model, batch = our_model(device), inputs(device)
        return inference_step(model, lambda: model.forward_features(batch))

    def forward_reference(device: torch.device) -> Step:
        model, batch = reference_model(device), inputs(device)
        return inference_step(model, lambda: model(**batch, return_repr=True))

    def target(device: torch.device) -> torch.Tensor:
        return torch.randn(count, 1, generator=torch.Generator().manual_seed(0)).to(device)

    def train_ours(device: torch.device) -> Step:
        from polyfm.core.tasks import Regression

        task = Regression(our_model(device), num_targets=1).to(device)
        batch, y = inputs(device), target(device)
        return train_step(task, lambda: task.loss(task(batch), y))

    def train_reference(device: torch.device) -> Step:
        model, batch, y = reference_model(device), inputs(device), target(device)
        return train_step(model, lambda: F.mse_loss(model(**batch), y))

    reference_name = "unimol_tools UniMolModel"
    return [
        BenchCase("mol/unimol/forward", "molecules", count, forward_ours, forward_reference, reference_name=reference_name),
        BenchCase("mol/unimol/train", "molecules", count, train_ours, train_reference, reference_name=reference_name),
    ]


def cases(quick: bool = True) -> list[BenchCase]:
    return [_conformer_case(quick), *_chemberta_cases(quick), *_unimol_cases(quick)]
