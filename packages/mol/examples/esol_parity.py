"""ESOL end to end: CSV of SMILES -> scaffold split -> fine-tune -> predictions CSV + parity plot.

POLYFM_DATA_DIR=/path/to/data python packages/mol/examples/esol_parity.py --model unimol --out reports/mol
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import lightning as L
import numpy as np

from polyfm.core.tasks import OptimConfig, Regression
from polyfm.mol.data import MoleculeDataModule
from polyfm.mol.models import ChemBERTa, UniMol
from polyfm.mol.predict import parity_plot, predict_smiles


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["chemberta", "unimol"], default="unimol")
    parser.add_argument("--csv", default=os.path.join(os.environ.get("POLYFM_DATA_DIR", "."), "mol", "esol_500.csv"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default="reports/mol")
    args = parser.parse_args()
    L.seed_everything(0)
    out = Path(args.out)
    dm = MoleculeDataModule(
        args.csv,
        model=args.model,
        split="scaffold",
        tokenizer=None,
        remove_hs=True,
        conformer_cache=str(out / "conformers"),
        conformer_workers=2,
        batch_size=32,
    )
    dm.setup()
    if args.model == "chemberta":
        encoder = ChemBERTa(
            vocab_size=len(dm.featuriser.tokenizer),
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=130,
            pooling="mean",
        )
    else:
        encoder = UniMol(
            encoder_layers=4,
            embed_dim=128,
            ffn_embed_dim=256,
            attention_heads=8,
            num_kernels=64,
            pretraining_heads=False,
            final_head_layer_norm=False,
            pooling="mean",
        )
    mean, std = dm.target_statistics()
    task = Regression(
        encoder,
        num_targets=1,
        target_names=dm.target_names,
        target_mean=mean,
        target_std=std,
        optim=OptimConfig(lr=1e-3, warmup_steps=20, weight_decay=0.01),
    )
    start = time.time()
    trainer = L.Trainer(
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(task, dm)
    test = dm.split[2]
    smiles = [dm.table.smiles[i] for i in test]
    predicted = predict_smiles(task, smiles, dm.featuriser, rows=[dm.table.rows[i] for i in test])[:, 0]
    measured = dm.table.targets[test, 0]
    baseline = float(np.sqrt(np.mean((measured - mean[0]) ** 2)))
    rmse = float(np.sqrt(np.mean((measured - predicted) ** 2)))
    out.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    pd.DataFrame({"smiles": smiles, "logSolubility": measured, "predicted": predicted}).to_csv(
        out / f"esol_{args.model}_test_predictions.csv", index=False
    )
    parity_plot(
        measured,
        predicted,
        out / f"esol_{args.model}_parity.png",
        title=f"ESOL scaffold test, {args.model} from scratch",
        unit="log mol/L",
    )
    print(
        f"{args.model}: test RMSE {rmse:.3f} (mean predictor {baseline:.3f}), {len(test)} molecules, {time.time() - start:.0f}s training"
    )


if __name__ == "__main__":
    main()
