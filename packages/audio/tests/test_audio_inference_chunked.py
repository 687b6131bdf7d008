"""``tag_file`` / ``plot_framewise`` in chunks (``chunk_seconds``): the trunk's time map stitched
on the file's grid and the head run once on it, so a multi-minute file's outputs equal the
whole file's, for every family (pooling by 32 and by 16, the wavegram branch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from polyfm.audio.inference import _run, plot_framewise, tag_file
from polyfm.audio.models import Cnn6, Cnn14, Cnn14_DecisionLevelMax, Wavegram_Logmel_Cnn14
from polyfm.core.errors import ConfigError

RATE = 32000


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2.5 minutes (and 123 samples, off every grid) of noise with a 1 kHz tone in the first 5 s of every 30 s."""
    path = tmp_path_factory.mktemp("long") / "long.wav"
    samples = 150 * RATE + 123
    t = np.arange(samples) / RATE
    signal = 0.05 * np.random.default_rng(0).standard_normal(samples) + 0.5 * np.sin(2 * np.pi * 1000 * t) * ((t % 30) < 5)
    sf.write(path, signal.astype(np.float32), RATE)
    return path


def _model(cls: type, random_batchnorm: Any, **options: object) -> torch.nn.Module:
    """Random weights and BatchNorm statistics, the head scaled so that the outputs span [0, 1]
    (a random head leaves them all near 0.5, which would make the comparison vacuous)."""
    torch.manual_seed(0)
    model = random_batchnorm(cls(classes_num=8, **options).eval())
    with torch.no_grad():
        model.fc_audioset.weight.mul_(5.0)
    return model


@pytest.mark.parametrize(
    ("cls", "options"),
    [(Cnn14_DecisionLevelMax, {"base_channels": 4}), (Cnn14, {"base_channels": 4}), (Cnn6, {"base_channels": 4}),
     (Wavegram_Logmel_Cnn14, {"base_channels": 16})],
)  # fmt: skip
def test_tag_file_in_chunks_equals_the_whole_file(long_wav: Path, cls: type, options: dict[str, int], random_batchnorm: Any) -> None:
    """40 s chunks with the default 4 s overlap (5 chunks): every output (clip, logits, embedding,
    and the SED model's 15001 frames and 468 segments) equals the whole file's to float rounding
    (measured: 3e-6 on logits of +-20, 2.4e-7 on probabilities), and so do the tags."""
    model = _model(cls, random_batchnorm, **options)
    whole = tag_file(model, long_wav, top_k=3)
    chunked = tag_file(model, long_wav, top_k=3, chunk_seconds=40.0)
    assert "waveform" in whole and "waveform" not in chunked  # chunked keeps no whole-file waveform
    assert sorted(chunked["output"]) == sorted(whole["output"])
    for key, expected in whole["output"].items():
        got = chunked["output"][key]
        assert got.shape == expected.shape, key
        scale = float(expected.abs().max())
        torch.testing.assert_close(got, expected, atol=1e-5 * max(scale, 1.0), rtol=0, msg=key)
    probabilities = whole["output"]["clipwise_output"]
    assert probabilities.max() - probabilities.min() > 0.5  # not vacuous
    if "framewise_output" in whole["output"]:
        assert whole["output"]["framewise_output"].shape == (1, 1 + (150 * RATE + 123) // 320, 8)
    assert [name for name, _ in chunked["tags"]] == [name for name, _ in whole["tags"]]


def test_plot_framewise_in_chunks_uses_the_stitched_log_mel(long_wav: Path, tmp_path: Path, random_batchnorm: Any) -> None:
    """The chunked log-mel (each chunk's kept frames) equals the front end on the whole file, and the plot is written."""
    model = _model(Cnn14_DecisionLevelMax, random_batchnorm, base_channels=4)
    _, waveform, log_mel = _run(model, long_wav, 30.0, None, log_mel=True)
    assert waveform is None and log_mel is not None
    whole = model.frontend(torch.from_numpy(sf.read(long_wav, dtype="float32")[0])[None])[0, 0]
    assert log_mel.shape == whole.shape == (15001, 64)
    torch.testing.assert_close(log_mel, whole, atol=1e-3, rtol=0)  # dB; fp32 STFT of the same samples
    png = plot_framewise(model, long_wav, tmp_path / "sed.png", top_k=3, chunk_seconds=30.0)
    assert png.stat().st_size > 1000


def test_chunk_options_of_tag_file_name_the_argument(tmp_path: Path, random_batchnorm: Any) -> None:
    path = tmp_path / "a.wav"
    sf.write(path, np.zeros(RATE, dtype=np.float32), RATE)
    model = _model(Cnn14_DecisionLevelMax, random_batchnorm, base_channels=4)
    with pytest.raises(ConfigError, match=r"chunk_overlap_seconds=2.0 is given without chunk_seconds"):
        tag_file(model, path, chunk_overlap_seconds=2.0)
    with pytest.raises(ConfigError, match=r"chunk_seconds=0.5 with chunk_overlap_seconds=0.25: Cnn14_DecisionLevelMax needs chunks of at least 0.63 s"):
        tag_file(model, path, chunk_seconds=0.5)
    with pytest.raises(ConfigError, match=r"chunk_overlap_seconds must be 0 or more seconds and less than chunk_seconds \(10.0\)"):
        tag_file(model, path, chunk_seconds=10.0, chunk_overlap_seconds=10.0)
    with pytest.raises(ConfigError, match=r"chunk_seconds must be positive seconds; got -1.0"):
        tag_file(model, path, chunk_seconds=-1.0)
    # a file shorter than one chunk (and than the model's minimum) is one zero-padded chunk, as whole
    short = tmp_path / "short.wav"
    sf.write(short, 0.1 * np.random.default_rng(0).standard_normal(3000).astype(np.float32), RATE)
    whole, chunked = tag_file(model, short), tag_file(model, short, chunk_seconds=10.0)
    torch.testing.assert_close(chunked["output"]["framewise_output"], whole["output"]["framewise_output"])
