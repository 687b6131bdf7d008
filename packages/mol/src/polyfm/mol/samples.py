"""Built-in sample molecules and the demo kit.

Without a data folder, the demo uses molecules enumerated here (substituted rings and
chains, a few hundred, no files) with a synthetic but chemically meaningful target:
RDKit's Crippen logP. With ``$POLYFM_DATA_DIR/mol``, it pretrains on the SMILES of all
three sample sets (ESOL, Tox21, QM9; labels unused) and fine-tunes on ESOL solubility
with a scaffold split.

The demo model is a small ChemBERTa (RoBERTa, atom-wise SMILES tokenizer): it needs no
3D conformers, so pretraining plus fine-tuning fits the demo's time budget on a CPU.
"""

from __future__ import annotations

import csv
import itertools
import tempfile
from functools import lru_cache
from pathlib import Path

import lightning as L

from polyfm.core.adaptation import Adaptation
from polyfm.core.encoder import Encoder
from polyfm.core.kit import DomainKit
from polyfm.core.pretrain import Pretraining
from polyfm.core.tasks import OptimConfig, Regression

_CORES = ("c1ccccc1", "c1ccncc1", "C1CCCCC1", "c1ccoc1", "c1ccsc1", "C1CCNCC1", "c1ccc2ccccc2c1", "C1CCOC1", "c1cnc[nH]1")
_LINKERS = ("", "C", "CC", "O", "N", "C(=O)", "C(=O)N", "S", "OC")
_TAILS = (
    "C",
    "CC",
    "CCC",
    "O",
    "N",
    "F",
    "Cl",
    "Br",
    "C(F)(F)F",
    "C(=O)O",
    "C#N",
    "OC",
    "N(C)C",
    "[N+](=O)[O-]",
    "CCCC",
    "C(C)C",
)


@lru_cache(maxsize=1)
def sample_smiles() -> tuple[str, ...]:
    """A few hundred valid, canonical, varied molecules built from cores, linkers and tails."""
    from rdkit import Chem, rdBase

    rdBase.DisableLog("rdApp.*")
    seen: dict[str, None] = {}
    for core, linker, tail in itertools.product(_CORES, _LINKERS, _TAILS):
        for smiles in (f"{tail}{linker}{core}", f"{core}{linker}{tail}"):
            mol = Chem.MolFromSmiles(smiles)
            if mol is not None:
                seen.setdefault(Chem.MolToSmiles(mol), None)
    return tuple(seen)


def write_sample_csv(path: str | Path, limit: int | None = None) -> Path:
    """The samples as a MoleculeNet-style CSV (``smiles,logP``)."""
    from rdkit import Chem
    from rdkit.Chem import rdMolDescriptors  # Crippen.MolLogP is this, and the stubs lack it

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    molecules = sample_smiles()[:limit] if limit else sample_smiles()
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["smiles", "logP"])
        for smiles in molecules:
            writer.writerow([smiles, f"{rdMolDescriptors.CalcCrippenDescriptors(Chem.MolFromSmiles(smiles))[0]:.4f}"])
    return path


def demo_kit(data_dir: Path | None, quick: bool = False) -> DomainKit:
    from polyfm.mol.data import MoleculeDataModule, MoleculePretrainDataModule
    from polyfm.mol.models.chemberta import ChemBERTa
    from polyfm.mol.objectives import MaskedLanguageModelling
    from polyfm.mol.tokenizers import SmilesTokenizer

    tokenizer = SmilesTokenizer.builtin(model_max_length=128)
    folder = Path(data_dir) / "mol" if data_dir is not None else None
    if folder is not None and (folder / "esol_500.csv").exists():
        finetune_csv = folder / "esol_500.csv"
        pretrain_smiles: list[str] = []
        for name in ("esol_500.csv", "tox21_500.csv", "qm9_500.csv"):
            if (folder / name).exists():
                with open(folder / name, newline="") as handle:
                    pretrain_smiles.extend(row["smiles"] for row in csv.DictReader(handle))
        target, source = "esol-logS (scaffold split)", f"{folder} (ESOL; pretraining on ESOL+Tox21+QM9 SMILES)"
    else:
        finetune_csv = write_sample_csv(
            Path(tempfile.mkdtemp(prefix="polyfm-mol-")) / "samples.csv", limit=240 if quick else None
        )
        pretrain_smiles = list(sample_smiles())
        target, source = "crippen-logP (built-in molecules, scaffold split)", "built-in samples"

    hidden, layers, ffn = (64, 2, 128) if quick else (128, 4, 256)

    def make_encoder() -> ChemBERTa:
        return ChemBERTa(
            vocab_size=len(tokenizer),
            max_position_embeddings=130,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pooling="mean",
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=ffn,
        )

    def make_pretraining(encoder: Encoder) -> L.LightningModule:
        return Pretraining(encoder, MaskedLanguageModelling.for_tokenizer(tokenizer), OptimConfig(lr=1e-3, warmup_steps=5))

    def make_pretrain_data() -> L.LightningDataModule:
        return MoleculePretrainDataModule(
            smiles=pretrain_smiles[:600] if quick else pretrain_smiles,
            model="chemberta",
            tokenizer=None,
            max_length=128,
            batch_size=64,
            val_fraction=0.05,
        )

    def finetune_data(fraction: float, seed: int) -> MoleculeDataModule:
        return MoleculeDataModule(
            str(finetune_csv),
            model="chemberta",
            split="scaffold",
            tokenizer=None,
            max_length=128,
            batch_size=32,
            label_fraction=fraction,
            seed=seed,
        )

    def make_task(encoder: Encoder, adaptation: Adaptation) -> L.LightningModule:
        data = finetune_data(1.0, 0)
        mean, std = data.target_statistics()
        return Regression(
            encoder,
            num_targets=data.num_tasks,
            adaptation=adaptation,
            optim=OptimConfig(lr=1e-3, warmup_steps=5),
            target_names=data.target_names,
            target_mean=mean,
            target_std=std,
        )

    return DomainKit(
        name="mol",
        target=target,
        metric="test/rmse",
        higher_is_better=False,
        make_encoder=make_encoder,
        make_pretraining=make_pretraining,
        make_pretrain_data=make_pretrain_data,
        make_task=make_task,
        make_finetune_data=finetune_data,
        pretrain_epochs=2 if quick else 10,
        finetune_epochs=3 if quick else 15,
        data_source=source,
    )
