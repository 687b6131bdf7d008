"""Adaptation modes on the toy encoder: what trains, what stays, what merges."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from polyfm.core import Adaptation, Classification, OptimConfig, build_trainer, greedy_soup, merge_lora, uniform_soup
from polyfm.core.errors import ConfigError
from polyfm.core.toy import ToyDataModule, ToyEncoder


def fit(task: L.LightningModule, tmp_path, epochs: int = 2) -> L.Trainer:
    trainer = build_trainer(max_epochs=epochs, default_root_dir=str(tmp_path), enable_progress_bar=False, loggers=(), enable_checkpointing=False)
    trainer.fit(task, ToyDataModule(n_train=128, n_val=64))
    return trainer


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_linear_probe_updates_only_the_head(tmp_path):
    L.seed_everything(0)
    task = Classification(ToyEncoder(), 3, adaptation=Adaptation(mode="linear"), optim=OptimConfig(lr=1e-2))
    encoder_before, head_before = snapshot(task.encoder), snapshot(task.head)
    fit(task, tmp_path)
    encoder_after = snapshot(task.encoder)
    for key, value in encoder_before.items():  # weights and BatchNorm running statistics alike
        assert torch.equal(value, encoder_after[key]), f"linear probe changed encoder entry {key}"
    assert any(not torch.equal(v, snapshot(task.head)[k]) for k, v in head_before.items())


def test_freeze_k_freezes_exactly_the_first_blocks(tmp_path):
    L.seed_everything(0)
    task = Classification(ToyEncoder(depth=3), 3, adaptation=Adaptation(mode="freeze", freeze_blocks=2), optim=OptimConfig(lr=1e-2))
    before = snapshot(task.encoder)
    fit(task, tmp_path, epochs=1)
    after = snapshot(task.encoder)
    frozen = [k for k in before if k.startswith(("stem.", "blocks.0."))]
    trained = [k for k in before if k.startswith(("blocks.1.", "blocks.2.", "norm.")) and before[k].is_floating_point()]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    with pytest.raises(ConfigError, match="has 5 blocks"):
        Classification(ToyEncoder(depth=3), 3, adaptation=Adaptation(mode="freeze", freeze_blocks=9))


def test_lora_trains_only_adapters_and_merges_to_the_same_function(tmp_path):
    L.seed_everything(0)
    encoder = ToyEncoder()
    base = {k: v.clone() for k, v in encoder.state_dict().items()}
    task = Classification(encoder, 3, adaptation=Adaptation(mode="lora", lora_rank=4), optim=OptimConfig(lr=5e-2))
    trainable = {n for n, p in task.encoder.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    fit(task, tmp_path)
    # base weights are untouched: every original tensor is still in the wrapped model, unchanged
    wrapped = task.encoder.state_dict()
    for key, value in base.items():
        wrapped_key = key if key in wrapped else key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(wrapped[wrapped_key], value), key
    lora_b = [p for n, p in task.encoder.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b), "LoRA B matrices did not train"
    x = torch.randn(16, 8)
    task.eval()
    with torch.no_grad():
        before = task(x)
        merge_lora(task.encoder)
        after = task(x)
    assert not any("lora_" in n for n, _ in task.encoder.named_parameters())
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-5)


def test_layer_wise_lr_decay_groups():
    encoder = ToyEncoder(depth=3)
    task = Classification(encoder, 3, adaptation=Adaptation(layer_decay=0.5), optim=OptimConfig(lr=1.0, weight_decay=0.1))
    groups = task.trainable_groups()
    names = encoder.block_names()  # stem, blocks.0-2, norm: 5 blocks
    by_block = {g["block"]: g["lr"] for g in groups}
    for index in range(len(names)):
        assert by_block[index] == pytest.approx(0.5 ** (len(names) - index)), names[index]
    head_groups = [g for g in groups if any(n.startswith("head.") for n in g["names"])]
    assert head_groups and all(g["lr"] == 1.0 for g in head_groups)
    assert all(g["weight_decay"] == 0.0 for g in groups if any(n.endswith(".bias") for n in g["names"]))
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in task.parameters() if p.requires_grad}


def test_soup_of_identical_models_changes_nothing_and_greedy_soup_beats_its_best_member(tmp_path):
    L.seed_everything(0)
    model = ToyEncoder()
    soup = uniform_soup([copy.deepcopy(model) for _ in range(3)])
    for key, value in model.state_dict().items():
        torch.testing.assert_close(soup.state_dict()[key], value)

    data = ToyDataModule(n_train=128, n_val=64)
    data.setup()
    val = data.val_set
    xs, ys = val.inputs, val.targets

    def accuracy(task):
        task.eval()
        with torch.no_grad():
            return (task(xs).argmax(-1) == ys).float().mean().item()

    members = []
    for seed, lr in ((0, 1e-2), (0, 3e-2), (0, 1e-4)):  # same init, different fine-tunes (the soup setting)
        L.seed_everything(seed)
        task = Classification(ToyEncoder(), 3, optim=OptimConfig(lr=lr))
        fit(task, tmp_path / f"m{lr}", epochs=1)
        members.append(task)
    soup, chosen = greedy_soup(members, accuracy)
    assert accuracy(soup) >= max(accuracy(m) for m in members)
    assert chosen[0] == max(range(3), key=lambda i: accuracy(members[i]))


class SegmenterWithHead(torch.nn.Module):
    """A whole model that carries its own output head, as U-Nets and forecasters do."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1))
        self.out = torch.nn.Conv2d(8, 3, 1)

    def head_names(self) -> list[str]:
        return ["out"]

    def forward(self, x):
        return self.out(self.body(x))


@pytest.mark.parametrize("mode", ["linear", "lora"])
def test_whole_model_tasks_keep_their_head_trainable(mode):
    from polyfm.core import Segmentation

    task = Segmentation(SegmenterWithHead(), 3, adaptation=Adaptation(mode=mode, lora_rank=2))
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert {"out.weight", "out.bias"} <= trainable
    assert not any(n.startswith("out.") and "lora_" in n for n, _ in task.model.named_parameters())
    others = trainable - {"out.weight", "out.bias"}
    assert (not others) if mode == "linear" else (others and all("lora_" in n for n in others))


def test_lora_leaves_grouped_convolutions_frozen_and_adapts_the_rest():
    # depthwise convolutions (MedNeXt, ConvNeXt blocks) are refused by PEFT for ranks that do not divide their groups
    from polyfm.core.adaptation import apply_adaptation, lora_target_names

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.Conv2d(8, 16, 1), torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 3))
    assert lora_target_names(model) == ["1", "3"]
    x = torch.rand(2, 8, 4, 4)
    reference = model(x).detach()
    apply_adaptation(model, Adaptation(mode="lora", lora_rank=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[0] for n in trainable} == {"1", "3"}, trainable  # the depthwise conv "0" has no adapter
    # adapters start at zero (lora_B), so the wrapped model is the same function
    torch.testing.assert_close(model(x), reference)
