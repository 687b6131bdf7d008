"""The demo kit: pretraining on generated multi-resolution series helps few-shot forecasting."""

from __future__ import annotations

import copy
import logging
import warnings

import lightning as L

from polyfm.core.adaptation import Adaptation
from polyfm.core.trainer import build_trainer
from polyfm.ts.samples import demo_kit

warnings.filterwarnings("ignore", ".*does not have many workers.*")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def _trainer(epochs: int, root):
    return build_trainer(max_epochs=epochs, enable_progress_bar=False, loggers=(), enable_checkpointing=False,
                         enable_model_summary=False, default_root_dir=str(root))


def test_ts_demo_kit_pretraining_beats_scratch(tmp_path) -> None:
    kit = demo_kit(None, quick=True)
    assert kit.metric == "test/mse" and not kit.higher_is_better
    L.seed_everything(0, verbose=False)
    encoder = kit.make_encoder()
    scratch = copy.deepcopy(encoder)
    _trainer(kit.pretrain_epochs, tmp_path / "pretrain").fit(kit.make_pretraining(encoder), kit.make_pretrain_data())
    scores = {}
    for name, model in (("pretrained", encoder), ("scratch", scratch)):
        task, data = kit.make_task(model, Adaptation(mode="full")), kit.make_finetune_data(0.05, 0)
        trainer = _trainer(kit.finetune_epochs, tmp_path / name)
        trainer.fit(task, data)
        scores[name] = trainer.test(task, data, verbose=False)[0][kit.metric]
    assert scores["pretrained"] < 0.85 * scores["scratch"], scores
    # a "linear probe" of a forecaster is the head-only recipe: decoder and head still train
    probe = kit.make_task(kit.make_encoder(), Adaptation(mode="linear"))
    assert {n.split(".")[1] for n, p in probe.named_parameters() if p.requires_grad} == {"decoder", "head"}
