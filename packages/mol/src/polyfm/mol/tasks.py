"""Molecule tasks: polyfm.core's Regression and Classification, averaging each molecule's
conformers at evaluation and prediction (Uni-Mol's multi-conformer protocol).

With ``MoleculeDataModule(num_conformers=K)`` an evaluation or prediction batch holds K input
rows per molecule and ``batch["conformer_molecule"]`` (each row's molecule). These tasks run the
model on every row, then take each molecule's mean, as the official Uni-Mol fine-tuning does
(``unimol/losses``: the validation outputs grouped by molecule and averaged): for Regression the
mean prediction in original units, for Classification the mean probability (sigmoid per label,
softmax over classes). Loss and metrics are then computed once per molecule. Without that key
(one conformer, ChemBERTa) they are the core tasks, output for output.

Probabilities rather than logits are averaged because that is what the official code scores
(its ``agg_auc`` is on mean probabilities), and a mean of probabilities is a mixture over the
geometries: one confident conformer cannot outvote the others by an unbounded logit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from polyfm.core.tasks import Classification, Regression


def molecule_mean(values: torch.Tensor, conformer_molecule: torch.Tensor, molecules: int) -> torch.Tensor:
    """``(molecules, ...)``: the mean of the rows of ``values`` that belong to each molecule
    (``conformer_molecule[i]`` is row i's molecule). No host sync: the counts are summed on the device."""
    index = conformer_molecule.to(values.device)
    sums = values.new_zeros((molecules, *values.shape[1:])).index_add_(0, index, values)
    counts = values.new_zeros(molecules).index_add_(0, index, torch.ones_like(index, dtype=values.dtype))
    return sums / counts.clamp(min=1).reshape(-1, *([1] * (values.dim() - 1)))


class MoleculeRegression(Regression):
    """:class:`polyfm.core.tasks.Regression` whose evaluation and predictions are each
    molecule's mean over its conformers (original units)."""

    averages_conformers = True

    def evaluation_output(self, batch: dict[str, Any]) -> torch.Tensor:
        # core's evaluation (loss, metrics per molecule) and predict_step take it from here
        pred: torch.Tensor = self(batch["input"])
        if "conformer_molecule" in batch:
            pred = molecule_mean(pred, batch["conformer_molecule"], len(batch["target"]))
        return pred


class MoleculeClassification(Classification):
    """:class:`polyfm.core.tasks.Classification` whose evaluation and predictions use each
    molecule's mean probability over its conformers. The evaluation loss is then the
    cross-entropy of those mean probabilities."""

    averages_conformers = True

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.multilabel else logits.softmax(-1)

    def molecule_probabilities(self, batch: dict[str, Any]) -> torch.Tensor:
        probabilities = self.probabilities(self(batch["input"]).float())
        if "conformer_molecule" in batch:
            probabilities = molecule_mean(probabilities, batch["conformer_molecule"], len(batch["target"]))
        return probabilities

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        if "conformer_molecule" not in batch:
            return super()._evaluate(batch, stage)
        probabilities = self.molecule_probabilities(batch)
        target = batch["target"]
        if self.multilabel:
            observed = ~torch.isnan(target)
            # written out: F.binary_cross_entropy refuses to run under CUDA autocast (mixed precision)
            p, t = probabilities.clamp(1e-7, 1 - 1e-7), torch.nan_to_num(target)
            losses = -(t * p.log() + (1 - t) * (1 - p).log())
            loss = (losses * observed).sum() / observed.sum().clamp(min=1)
        else:
            loss = F.nll_loss(probabilities.clamp(min=1e-12).log(), target.long())
        self.log(f"{stage}/loss", loss, batch_size=len(target), sync_dist=True)
        metrics = self.metrics[f"{stage}_"]
        if self.multilabel:
            metrics.update(probabilities, torch.nan_to_num(target, nan=-1).long())
        else:
            metrics.update(probabilities, target.long())  # accuracy and F1 take the argmax, as of logits
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, batch_size=len(target))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        if "conformer_molecule" not in batch:
            return super().predict_step(batch, batch_idx)
        return {"probabilities": self.molecule_probabilities(batch), "meta": batch.get("meta")}
