"""Sound event detection: frame F1, strong-label fine-tuning of a decision-level model."""

from __future__ import annotations

import lightning as L
import torch

from polyfm.audio.models import Cnn14_DecisionLevelMax
from polyfm.audio.tasks import SoundEventDetection, frame_f1
from polyfm.core.adaptation import Adaptation
from polyfm.core.data import TensorDictDataset
from polyfm.core.tasks import OptimConfig


def test_frame_f1_by_hand() -> None:
    target = torch.tensor([[[1, 0], [1, 0], [0, 1], [0, 0]]], dtype=torch.float)
    probs = torch.tensor([[[0.9, 0.1], [0.2, 0.1], [0.1, 0.8], [0.7, 0.1]]])
    # TP=2 (frame0 c0, frame2 c1), FP=1 (frame3 c0), FN=1 (frame1 c0): F1 = 4 / (4 + 1 + 1)
    assert torch.isclose(frame_f1(probs, target), torch.tensor(4 / 6))


def _events(n: int, seconds: float = 1.28, seed: int = 0) -> TensorDictDataset:
    """A 1 kHz tone (class 0) and a noise burst (class 1) at random times; strong labels at 100 frames/s."""
    g = torch.Generator().manual_seed(seed)
    samples, frames = int(32000 * seconds), 1 + int(32000 * seconds) // 320
    t = torch.arange(samples) / 32000
    inputs, targets = torch.zeros(n, samples), torch.zeros(n, frames, 2)
    for i in range(n):
        inputs[i] = 0.01 * torch.randn(samples, generator=g)
        for cls in range(2):
            if torch.rand((), generator=g) < 0.7:
                start = float(torch.rand((), generator=g)) * seconds * 0.6
                end = start + 0.3 + float(torch.rand((), generator=g)) * 0.2
                mask = (t >= start) & (t < end)
                signal = torch.sin(2 * torch.pi * 1000 * t) if cls == 0 else torch.randn(samples, generator=g)
                inputs[i] += 0.3 * signal * mask
                targets[i, int(start * 100) : int(end * 100) + 1, cls] = 1.0
    return TensorDictDataset(inputs, targets)


def test_sed_finetune_loss_falls_and_frame_f1() -> None:
    L.seed_everything(0)
    encoder = Cnn14_DecisionLevelMax(base_channels=4, classes_num=527, spec_augment=False, block_dropout=0.0, head_dropout=0.0)
    task = SoundEventDetection(encoder, num_classes=2, adaptation=Adaptation(mode="full"), optim=OptimConfig(lr=3e-3, weight_decay=0.0))
    data = _events(16)
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    optimizer = torch.optim.AdamW(task.parameters(), lr=3e-3)
    losses = []
    task.train()
    for _ in range(8):
        for batch in loader:
            loss = task.loss(task(batch["input"]), batch["target"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    task.eval()
    with torch.no_grad():
        out = task(data.inputs[:4])
    assert out["framewise_logits"].shape == (4, data.targets.shape[1], 2)
    f1 = frame_f1(torch.sigmoid(out["framewise_logits"]), data.targets[:4])
    assert 0.0 <= float(f1) <= 1.0
    # weak labels (clip tags) train through the max over segments
    weak = task.loss(task(data.inputs[:2]), data.targets[:2].amax(dim=1))
    assert torch.isfinite(weak)


def test_tag_file_and_plot_framewise_png(tmp_path) -> None:
    import numpy as np
    import pytest
    import soundfile as sf

    pytest.importorskip("matplotlib")
    from polyfm.audio.inference import audioset_labels, plot_framewise, tag_file

    (tmp_path / "labels.csv").write_text("index,mid,display_name\n0,/m/a,Speech\n1,/m/b,Dog\n2,/m/c,Music\n")
    names = audioset_labels(tmp_path / "labels.csv")
    assert names == ["Speech", "Dog", "Music"]
    wav = tmp_path / "clip.wav"
    sf.write(wav, (0.2 * np.sin(2 * np.pi * 500 * np.arange(24000) / 16000)).astype(np.float32), 16000)  # 1.5 s at 16 kHz
    model = Cnn14_DecisionLevelMax(base_channels=4, classes_num=3)
    result = tag_file(model, wav, names, top_k=2)
    assert len(result["tags"]) == 2 and result["tags"][0][1] >= result["tags"][1][1]
    assert result["waveform"].shape == (1, 48000)  # resampled to the model's 32 kHz
    png = plot_framewise(model, wav, tmp_path / "sed.png", names, top_k=3)
    from polyfm.audio.inference import extract_embeddings

    batches = [{"input": result["waveform"].repeat(3, 1), "target": torch.tensor([0, 1, 2]), "meta": ["a", "b", "c"]}]
    probe = extract_embeddings(model, batches)
    assert probe["embedding"].shape == (3, model.feature_dim) and probe["meta"] == ["a", "b", "c"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_event_list_to_frame_targets(tmp_path) -> None:
    import numpy as np
    import soundfile as sf

    from polyfm.audio.data import SoundEventDataModule

    for name in ("a.wav", "b.wav"):
        sf.write(tmp_path / name, np.zeros(16000, np.float32) + 0.01, 16000)
    (tmp_path / "events.tsv").write_text("filename\tonset\toffset\tevent_label\na.wav\t0.10\t0.30\tdog\na.wav\t0.5\t0.9\tspeech\nb.wav\t\t\t\n")
    dm = SoundEventDataModule(str(tmp_path / "events.tsv"), val=str(tmp_path / "events.tsv"), clip_seconds=1.0, batch_size=2)
    dm.setup()
    assert dm.class_names == ["dog", "speech"]
    batch = next(iter(dm.val_dataloader()))
    target = batch["target"]
    assert target.shape == (2, 101, 2)  # 1 s at 32 kHz, hop 320
    assert target[0, 10:31, 0].all() and not target[0, 32:, 0].any() and target[0, 50:91, 1].all()
    assert target[1].sum() == 0
