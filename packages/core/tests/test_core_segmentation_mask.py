"""Pixels outside ``batch["valid"]`` (nodata, padding) count in no loss and no metric."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.segmentation import DiceScore

from polyfm.core import OptimConfig, Segmentation, build_trainer


class Batches(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def _loader(batches):
    return torch.utils.data.DataLoader(Batches(batches), batch_size=None)


def _batch(seed: int, garbage: int | None = None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 2, 12, 12, generator=g)
    target = (x[:, :1] > 0).long() + (x[:, 1:] > 1).long()  # classes 0..2
    valid = torch.rand(4, 12, 12, generator=g) > 0.4  # nodata elsewhere: no channel axis, as geo's readers give it
    if garbage is not None:  # what a filled nodata pixel's label might be: anything
        target = torch.where(valid.unsqueeze(1), target, torch.full_like(target, garbage))
    return {"input": x, "target": target, "valid": valid}


def _task(**kw):
    torch.manual_seed(0)
    return Segmentation(torch.nn.Conv2d(2, 3, 3, padding=1), 3, optim=OptimConfig(lr=1e-2), **kw)


def test_masked_pixels_do_not_enter_the_loss_or_its_gradient():
    task = _task()
    batch = _batch(0, garbage=2)
    logits = task(batch["input"])
    loss = task.compute_loss(logits, task.masked_target(batch))
    keep = batch["valid"]
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[keep], batch["target"][:, 0][keep])
    torch.testing.assert_close(loss, expected)
    other = {**batch, "target": torch.where(keep.unsqueeze(1), batch["target"], torch.zeros_like(batch["target"]))}
    torch.testing.assert_close(task.compute_loss(logits, task.masked_target(other)), loss)


@pytest.mark.parametrize("include_background", [False, True])
def test_dice_counts_only_valid_pixels(tmp_path, include_background):
    task = _task(include_background=include_background)
    batches = [_batch(s, garbage=1) for s in range(3)]
    trainer = build_trainer(max_epochs=1, default_root_dir=str(tmp_path), enable_progress_bar=False, loggers=(), enable_checkpointing=False)
    result = trainer.validate(task, _loader(batches), verbose=False)[0]
    reference = DiceScore(3, include_background=include_background, average="none", input_format="index")
    with torch.no_grad():
        for b in batches:  # Dice is per image: each image's valid pixels alone, as one flat image
            prediction = task(b["input"]).argmax(1)
            for i, keep in enumerate(b["valid"]):
                reference.update(prediction[i][keep][None], b["target"][i, 0][keep][None])
    expected = torch.nanmean(reference.compute())
    assert result["val/dice"] == pytest.approx(float(expected), abs=1e-6)


def test_training_with_masks_learns_the_valid_pixels(tmp_path):
    task = _task()
    batches = [_batch(s, garbage=0) for s in range(8)]
    trainer = build_trainer(max_epochs=15, default_root_dir=str(tmp_path), enable_progress_bar=False, loggers=(), enable_checkpointing=False)
    before = trainer.validate(task, _loader(batches), verbose=False)[0]["val/loss"]
    trainer.fit(task, _loader(batches))
    after = trainer.validate(task, _loader(batches), verbose=False)[0]["val/loss"]
    assert after < 0.6 * before


def test_a_loss_that_cannot_mask_is_refused_for_masked_batches():
    task = _task(loss=torch.nn.MSELoss())
    with pytest.raises(ValueError, match="MSELoss cannot leave pixels out"):
        task.training_step(_batch(0), 0)
    accepted = _task(loss=torch.nn.CrossEntropyLoss(ignore_index=-100))
    accepted._refuse_unmaskable_loss(_batch(0))  # declares the same ignore_index: fine
