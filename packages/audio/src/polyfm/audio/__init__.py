"""polyfm.audio: PANNs (Cnn14, Cnn14_16k, Cnn14_8k, Cnn10, Cnn6, Cnn14_DecisionLevelMax,
Wavegram_Logmel_Cnn14) with a torchaudio front end, official checkpoints, audio
readers and DataModules, AudioSet-style and self-supervised pretraining.

Names are imported on first use, so ``import polyfm.audio`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MODELS": "polyfm.audio.models",
    "Cnn14": "polyfm.audio.models",
    "Cnn14_16k": "polyfm.audio.models",
    "Cnn14_8k": "polyfm.audio.models",
    "Cnn10": "polyfm.audio.models",
    "Cnn6": "polyfm.audio.models",
    "Cnn14_DecisionLevelMax": "polyfm.audio.models",
    "Wavegram_Logmel_Cnn14": "polyfm.audio.models",
    "LogMelFrontEnd": "polyfm.audio.models.frontend",
    "SpecAugment": "polyfm.audio.models.frontend",
    "mixup_lambdas": "polyfm.audio.models.frontend",
    "do_mixup": "polyfm.audio.models.frontend",
    "WEIGHTS": "polyfm.audio.weights",
    "to_panns_state_dict": "polyfm.audio.weights",
    "load_audio": "polyfm.audio.data",
    "AudioClipDataset": "polyfm.audio.data",
    "AudioClipsDataModule": "polyfm.audio.data",
    "FSDDDataModule": "polyfm.audio.data",
    "UnlabelledAudioDataModule": "polyfm.audio.data",
    "read_manifest_csv": "polyfm.audio.data",
    "read_audioset_csv": "polyfm.audio.data",
    "read_fold_csv": "polyfm.audio.data",
    "read_folder": "polyfm.audio.data",
    "read_fsdd": "polyfm.audio.data",
    "read_events_csv": "polyfm.audio.data",
    "SoundEventDataModule": "polyfm.audio.data",
    "AudioSetTagging": "polyfm.audio.objectives",
    "ContrastiveAudio": "polyfm.audio.objectives",
    "SoundEventDetection": "polyfm.audio.tasks",
    "frame_f1": "polyfm.audio.tasks",
    "tag_file": "polyfm.audio.inference",
    "extract_embeddings": "polyfm.audio.inference",
    "plot_framewise": "polyfm.audio.inference",
    "audioset_labels": "polyfm.audio.inference",
    "AudioPredictionWriter": "polyfm.audio.predict",
    "detect_events": "polyfm.audio.predict",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'polyfm.audio' has no attribute {name!r}")
