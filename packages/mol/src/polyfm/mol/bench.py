"""Benchmarks against the reference implementations, same configuration, same process:

* ``mol/conformers/etkdg``: ETKDG + MMFF conformers per second (ours vs unimol_tools'
  ``inner_smi2coords``, one process each, same seed);
* ``mol/chemberta-77m/mlm-train``: ChemBERTa-2 77M masked-LM training step, tokens/s
  (ours vs transformers' ``RobertaForMaskedLM`` with its own loss);
* ``mol/unimol/forward``: Uni-Mol (molecule architecture, 15 x 512) forward, molecules/s
  (ours vs unimol_tools' ``UniMolModel`` loaded from the same random checkpoint).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from polyfm.core.bench import BenchCase

SMILES = (
    "CC(=O)Oc1ccccc1C(=O)O", "CN1CCC[C@H]1c1cccnc1", "CC(C)Cc1ccc(C(C)C(=O)O)cc1", "O=C(O)c1ccccc1O", "CCN(CC)CCOC(=O)c1ccc(N)cc1",
    "COc1ccc2[nH]cc(CCNC(C)=O)c2c1", "CC1=C(C(=O)OC)C(c2ccccc2[N+](=O)[O-])C(C(=O)OC)=C1C", "Clc1ccc(C(c2ccccc2)n2ccnc2)cc1",
    "CC(C)NCC(O)c1ccc(O)c(O)c1", "OC(c1ccccc1)(c1ccccc1)C1CCNCC1", "CN1C(=O)CN=C(c2ccccc2)c2cc(Cl)ccc21", "Nc1ccc(S(=O)(=O)Nc2ccccn2)cc1",
    "CC(=O)Nc1ccc(O)cc1", "c1ccc2c(c1)ccc1ccccc12", "OCC1OC(O)C(O)C(O)C1O", "CCCCCCCCCCCCCCCC(=O)O",
)  # fmt: skip


def _conformer_case(quick: bool) -> BenchCase:
    smiles = SMILES[:8] if quick else SMILES

    def ours(device: torch.device):
        from polyfm.mol.conformers import ConformerSettings, embed_smiles

        settings = ConformerSettings(seed=42, remove_hs=False, mmff=True)
        return lambda: [embed_smiles(s, settings) for s in smiles]

    def reference(device: torch.device):
        from unimol_tools.data.conformer import inner_smi2coords

        return lambda: [inner_smi2coords(s, seed=42, mode="fast", remove_hs=False) for s in smiles]

    return BenchCase(
        "mol/conformers/etkdg", "molecules", len(smiles), ours, reference, reference_name="unimol_tools inner_smi2coords"
    )


def _chemberta_case(quick: bool) -> BenchCase:
    batch, length = (8, 48) if quick else (64, 96)
    config = {
        "vocab_size": 600,
        "hidden_size": 384,
        "num_hidden_layers": 3,
        "num_attention_heads": 12,
        "intermediate_size": 464,
        "max_position_embeddings": 515,
    }

    def tokens(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(5, 590, (batch, length), generator=generator)
        ids[:, 0], ids[:, -1] = 0, 2
        return ids.to(device), torch.ones_like(ids).to(device)

    def ours(device: torch.device):
        from polyfm.mol.models.chemberta import ChemBERTa
        from polyfm.mol.objectives import MaskedLanguageModelling

        model = ChemBERTa(**config).to(device).train()
        objective = MaskedLanguageModelling(mask_id=4, vocab_size=600, special_ids=[0, 1, 2, 3, 4])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids, mask = tokens(device)
        example = {"input": {"input_ids": ids, "attention_mask": mask}}

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            objective(model, example)["loss"].backward()
            optimizer.step()

        return step

    def reference(device: torch.device):
        from transformers import RobertaConfig, RobertaForMaskedLM

        model = RobertaForMaskedLM(RobertaConfig(**config, type_vocab_size=1, pad_token_id=1)).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids, mask = tokens(device)
        labels = torch.where(torch.rand(ids.shape, device=device) < 0.15, ids, torch.full_like(ids, -100))

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()

        return step

    flops = 6 * 2.9e6 * 1.0  # ~6 x non-embedding parameters per token (3 layers of 384/464)
    return BenchCase(
        "mol/chemberta-77m/mlm-train",
        "tokens",
        batch * length,
        ours,
        reference,
        flops_per_item=flops,
        reference_name="transformers RobertaForMaskedLM",
    )


def _unimol_batch(dictionary, count: int) -> dict[str, torch.Tensor]:
    from polyfm.mol.conformers import ConformerSettings, collate_unimol, embed_smiles, unimol_features

    settings = ConformerSettings(seed=42, remove_hs=False, mmff=False)
    features = []
    for s in (SMILES * 4)[:count]:
        conformer = embed_smiles(s, settings)
        features.append(unimol_features(conformer.atoms, conformer.coordinates, dictionary))
    return collate_unimol(features, dictionary.pad)


def _unimol_case(quick: bool) -> BenchCase:
    count = 4 if quick else 32
    state: dict[str, object] = {}

    def build(device: torch.device):
        """Our model on unimol_tools' symbol order, and its checkpoint for the reference."""
        if "model" not in state:
            from polyfm.mol.models.unimol import OFFICIAL_MOL_SYMBOLS, UniMol, UniMolDictionary

            folder = Path(tempfile.mkdtemp(prefix="polyfm-bench-unimol-"))
            UniMolDictionary(OFFICIAL_MOL_SYMBOLS).write(folder / "dict.txt")
            # unimol_tools numbers its specials [CLS],[UNK],[PAD],[SEP] first
            order = ["[CLS]", "[UNK]", "[PAD]", "[SEP]", *[s for s in OFFICIAL_MOL_SYMBOLS if not s.startswith("[")]]
            torch.manual_seed(0)
            model = UniMol(dictionary=order, final_head_layer_norm=False).eval()
            torch.save({"model": model.official_state_dict()}, folder / "mol_pre_all_h_220816.pt")
            state.update(model=model, folder=folder, batch=_unimol_batch(model.dictionary, count))
        return state

    def ours(device: torch.device):
        built = build(device)
        model = built["model"].to(device)  # type: ignore[union-attr]
        batch = {k: v.to(device) for k, v in built["batch"].items()}  # type: ignore[union-attr]

        def step() -> torch.Tensor:
            with torch.inference_mode():
                return model.forward_features(batch)

        return step

    def reference(device: torch.device):
        from unimol_tools.models.unimol import UniMolModel

        built = build(device)
        folder = built["folder"]
        model = (
            UniMolModel(
                output_dim=1,
                data_type="molecule",
                pretrained_model_path=str(folder / "mol_pre_all_h_220816.pt"),  # type: ignore[operator]
                pretrained_dict_path=str(folder / "dict.txt"),
            )
            .to(device)
            .eval()
        )  # type: ignore[operator]
        batch = {k: v.to(device) for k, v in built["batch"].items()}  # type: ignore[union-attr]

        def step() -> torch.Tensor:
            with torch.inference_mode():
                return model(**batch, return_repr=True)

        return step

    return BenchCase("mol/unimol/forward", "molecules", count, ours, reference, reference_name="unimol_tools UniMolModel")


def cases(quick: bool = True) -> list[BenchCase]:
    return [_conformer_case(quick), _chemberta_case(quick), _unimol_case(quick)]
