"""Built-in sample audio and the demo kit (``polyfm.kits`` entry point).

Without a data folder the demo uses generated sounds: eight source types (harmonic
tones at different pitches, rising and falling chirps, pulse trains, band-limited
noise). Pretraining is PANNs-style tagging of random mixtures of 1-3 sources (multi-label,
mixup); the fine-tuning target is single-source classification of quieter sources in
louder noise. With ``data_dir`` holding ``audio/fsdd`` the demo pretrains
self-supervised (contrastive, two crops per clip) on the FSDD train split's audio, labels
unused, and fine-tunes on spoken digits (test split: index 0-4).
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch

from polyfm.audio.data import AudioClipDataset, FSDDDataModule, TwoViewAudioDataset, read_fsdd
from polyfm.audio.models import Cnn6
from polyfm.audio.objectives import AudioSetTagging, ContrastiveAudio
from polyfm.core.adaptation import Adaptation
from polyfm.core.data import DictDataModule, TensorDictDataset
from polyfm.core.encoder import Encoder
from polyfm.core.kit import DomainKit
from polyfm.core.pretrain import Pretraining
from polyfm.core.tasks import Classification, OptimConfig

SAMPLE_RATE = 32000
SOURCES = 8


def synthetic_source(kind: int, samples: int, generator: torch.Generator, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """One sound of type ``kind`` (0-7) at a random time within the clip, peak ~1."""
    t = torch.arange(samples) / sample_rate
    duration = 0.25 + 0.25 * float(torch.rand((), generator=generator))
    start = float(torch.rand((), generator=generator)) * max(0.0, samples / sample_rate - duration)
    envelope = ((t >= start) & (t < start + duration)).float() * torch.sin(torch.pi * ((t - start) / duration).clamp(0, 1))
    jitter = 1 + 0.05 * float(torch.randn((), generator=generator))
    if kind < 3:  # harmonic tones at 220 / 440 / 880 Hz
        f0 = 220.0 * 2**kind * jitter
        wave = sum(torch.sin(2 * math.pi * f0 * h * t) / h for h in (1, 2, 3))
    elif kind < 5:  # chirps, rising or falling between 500 Hz and 4 kHz
        f_start, f_end = (500.0, 4000.0) if kind == 3 else (4000.0, 500.0)
        phase = 2 * math.pi * (f_start * (t - start) + (f_end - f_start) * (t - start) ** 2 / (2 * duration))
        wave = torch.sin(phase * jitter)
    elif kind == 5:  # pulse train at 12 Hz
        wave = (torch.sin(2 * math.pi * 12 * t) > 0.8).float() * torch.sin(2 * math.pi * 2000 * t)
    else:  # band-limited noise: low (kind 6) or high (kind 7)
        noise = torch.randn(samples, generator=generator)
        spectrum = torch.fft.rfft(noise)
        freqs = torch.fft.rfftfreq(samples, 1 / sample_rate)
        band = (freqs < 1000) if kind == 6 else (freqs > 6000) & (freqs < 12000)
        wave = torch.fft.irfft(spectrum * band, n=samples)
        wave = wave / wave.abs().max().clamp(min=1e-6)
    return envelope * wave


def synthetic_tagging(n: int, seconds: float, seed: int) -> TensorDictDataset:
    """Mixtures of 1-3 sources with multi-label targets (the pretraining set)."""
    g = torch.Generator().manual_seed(seed)
    samples = int(SAMPLE_RATE * seconds)
    inputs, targets = torch.zeros(n, samples), torch.zeros(n, SOURCES)
    for i in range(n):
        count = int(torch.randint(1, 4, (1,), generator=g))
        for kind in torch.randperm(SOURCES, generator=g)[:count].tolist():
            inputs[i] += 0.3 * synthetic_source(kind, samples, g)
            targets[i, kind] = 1.0
        inputs[i] += 0.02 * torch.randn(samples, generator=g)
    return TensorDictDataset(inputs, targets, meta=[f"synthetic-mix-{seed}-{i}" for i in range(n)])


def synthetic_classification(n: int, seconds: float, seed: int, snr_scale: float = 0.15) -> TensorDictDataset:
    """One quiet source in louder noise, its type as the class (the fine-tuning target)."""
    g = torch.Generator().manual_seed(seed)
    samples = int(SAMPLE_RATE * seconds)
    labels = torch.arange(n) % SOURCES
    inputs = torch.stack([snr_scale * synthetic_source(int(k), samples, g) + 0.05 * torch.randn(samples, generator=g) for k in labels])
    return TensorDictDataset(inputs, labels, meta=[f"synthetic-{seed}-{i}" for i in range(n)])


class SyntheticAudioDataModule(DictDataModule):
    """Generated clips in memory: ``task="tagging"`` (pretraining) or ``"classification"``."""

    def __init__(
        self,
        task: str = "classification",
        n_train: int = 256,
        n_eval: int = 128,
        clip_seconds: float = 0.5,
        batch_size: int = 32,
        num_workers: int = 0,
        label_fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, label_fraction=label_fraction, seed=seed)
        self.task, self.n_train, self.n_eval, self.clip_seconds = task, n_train, n_eval, clip_seconds
        self._labels: list[int] | None = None

    def build(self) -> tuple[TensorDictDataset, TensorDictDataset, TensorDictDataset]:
        make = synthetic_tagging if self.task == "tagging" else synthetic_classification
        offset = 0 if self.task == "tagging" else 100
        train = make(self.n_train, self.clip_seconds, offset + 1)
        if self.task != "tagging":
            self._labels = train.targets.tolist()
        return train, make(self.n_eval, self.clip_seconds, offset + 2), make(self.n_eval, self.clip_seconds, offset + 3)

    def train_labels(self) -> list[int] | None:
        return self._labels


class FSDDTwoViewDataModule(DictDataModule):
    """FSDD train-split audio (labels unused) as two-view batches for contrastive pretraining."""

    def __init__(self, root: str, max_clips: int | None = None, clip_seconds: float = 0.5, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, seed=seed)
        self.root, self.max_clips, self.clip_seconds = root, max_clips, clip_seconds

    def build(self) -> tuple[TwoViewAudioDataset, TwoViewAudioDataset, None]:
        paths, _, _ = read_fsdd(self.root, "train")
        if self.max_clips is not None:
            step = max(1, len(paths) // self.max_clips)
            paths = paths[::step][: self.max_clips]
        held_out = paths[::10]  # every 10th clip for the validation loss
        train = [p for i, p in enumerate(paths) if i % 10]

        def views(p: list[Path]) -> TwoViewAudioDataset:
            return TwoViewAudioDataset(AudioClipDataset(p, None, sample_rate=SAMPLE_RATE, clip_seconds=self.clip_seconds), gain_db=6.0)

        return views(train), views(held_out), None


def demo_encoder(classes_num: int = SOURCES) -> Cnn6:
    """A demo-sized Cnn6: 4 base channels, 32 mel bins, 20 ms hop (a few seconds an epoch on a CPU)."""
    return Cnn6(
        sample_rate=SAMPLE_RATE, hop_size=640, mel_bins=32, classes_num=classes_num, base_channels=4,
        spec_augment=False, block_dropout=0.0, head_dropout=0.0,
    )  # fmt: skip


def demo_kit(data_dir: Path | None, quick: bool = False) -> DomainKit:
    fsdd = Path(data_dir) / "audio" / "fsdd" if data_dir is not None else None
    real = fsdd is not None and (fsdd / "recordings").is_dir()
    optim = OptimConfig(lr=1e-2, weight_decay=0.01, warmup_steps=2)
    clip_seconds = 0.5

    def make_task(encoder: Encoder, adaptation: Adaptation) -> L.LightningModule:
        return Classification(encoder, 10 if real else SOURCES, adaptation=adaptation, optim=optim)

    if real:
        assert fsdd is not None

        def make_pretraining(encoder: Encoder) -> L.LightningModule:
            return Pretraining(encoder, ContrastiveAudio(encoder.feature_dim, projection_dim=32, temperature=0.2), optim)

        def make_pretrain_data() -> L.LightningDataModule:
            return FSDDTwoViewDataModule(str(fsdd), max_clips=512 if quick else None, clip_seconds=clip_seconds)

        def make_finetune_data(fraction: float, seed: int) -> L.LightningDataModule:
            return FSDDDataModule(
                str(fsdd), sample_rate=SAMPLE_RATE, clip_seconds=clip_seconds, max_train_clips=1000 if quick else None,
                cache=True, label_fraction=fraction, seed=seed,
            )  # fmt: skip

        target, source = "fsdd-digits", f"{fsdd} (FSDD, 8 kHz resampled to 32 kHz)"
    else:

        def make_pretraining(encoder: Encoder) -> L.LightningModule:
            return Pretraining(encoder, AudioSetTagging(mixup_alpha=1.0), optim)

        def make_pretrain_data() -> L.LightningDataModule:
            return SyntheticAudioDataModule("tagging", n_train=192 if quick else 1024, n_eval=64, clip_seconds=clip_seconds)

        def make_finetune_data(fraction: float, seed: int) -> L.LightningDataModule:
            n = 128 if quick else 512
            return SyntheticAudioDataModule("classification", n_train=n, n_eval=128, clip_seconds=clip_seconds, label_fraction=fraction, seed=seed)

        target, source = "synthetic-sound-types", "built-in samples (generated sounds)"

    return DomainKit(
        name="audio",
        target=target,
        metric="test/acc",
        higher_is_better=True,
        make_encoder=lambda: demo_encoder(),
        make_pretraining=make_pretraining,
        make_pretrain_data=make_pretrain_data,
        make_task=make_task,
        make_finetune_data=make_finetune_data,
        pretrain_epochs=2 if quick else 10,
        finetune_epochs=(8 if real else 3) if quick else 15,
        data_source=source,
    )
