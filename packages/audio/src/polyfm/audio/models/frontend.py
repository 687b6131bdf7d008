"""What every PANNs model shares: the log-mel front end, SpecAugment and mixup.

PANNs computes its log-mel with torchlibrosa (an STFT written as two Conv1d layers and
a mel matrix stored as parameters). We compute the same numbers with torchaudio's STFT on
the model's device: a periodic Hann window, centred frames with reflect padding, power 2,
librosa's Slaney mel filters with Slaney area normalisation (our float64
``slaney_mel_filters``), then ``10*log10`` with
``amin=1e-10``, ``ref=1.0`` and no ``top_db``. The torchlibrosa tensors in released
checkpoints are checked against ours when loading (see ``PannsModel``) and dropped.
"""

from __future__ import annotations

import math

import torch
import torchaudio
from torch import nn


def _hz_to_slaney_mel(hz: torch.Tensor) -> torch.Tensor:
    """Slaney's mel scale (librosa's default, ``htk=False``): linear below 1 kHz, log above."""
    linear = hz / (200.0 / 3)
    log = 15.0 + torch.log(hz.clamp(min=1e-10) / 1000.0) / (math.log(6.4) / 27.0)
    return torch.where(hz >= 1000.0, log, linear)


def _slaney_mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    linear = mel * (200.0 / 3)
    log = 1000.0 * torch.exp((math.log(6.4) / 27.0) * (mel - 15.0))
    return torch.where(mel >= 15.0, log, linear)


def slaney_mel_filters(sample_rate: int, n_fft: int, mel_bins: int, fmin: float, fmax: float) -> torch.Tensor:
    """librosa's ``filters.mel(htk=False, norm="slaney")`` as ``(n_fft // 2 + 1, mel_bins)``
    float32, computed in float64. Not torchaudio's ``melscale_fbanks``: it places the FFT
    bins at ``linspace(0, sample_rate // 2)``, integer division, so at odd rates (11025 Hz)
    every filter is off (5e-5, 0.2 dB of log-mel vs librosa / torchlibrosa); in float32 it
    is also 10-100x further from librosa at the common rates."""
    freqs = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = torch.tensor([float(fmin), float(fmax)], dtype=torch.float64)
    low, high = _hz_to_slaney_mel(edges).tolist()
    points = _slaney_mel_to_hz(torch.linspace(low, high, mel_bins + 2, dtype=torch.float64))  # filter edges, Hz
    widths = points[1:] - points[:-1]
    ramps = points[:, None] - freqs[None, :]
    rising, falling = -ramps[:-2] / widths[:-1, None], ramps[2:] / widths[1:, None]
    filters = torch.clamp(torch.minimum(rising, falling), min=0.0)
    filters = filters * (2.0 / (points[2:] - points[:-2]))[:, None]  # Slaney area normalisation
    return filters.T.float().contiguous()


class LogMelFrontEnd(nn.Module):
    """Waveform ``(B, samples)`` -> log-mel ``(B, 1, frames, mel_bins)``, as PANNs.

    ``frames = 1 + samples // hop_size``. Its buffers are not persistent: they are
    derived from the configuration, so they never enter a state dict.
    """

    window: torch.Tensor  # buffers, declared for type checkers (register_buffer sets them)
    mel_fb: torch.Tensor

    def __init__(
        self,
        sample_rate: int = 32000,
        window_size: int = 1024,
        hop_size: int = 320,
        mel_bins: int = 64,
        fmin: float = 50.0,
        fmax: float = 14000.0,
        ref: float = 1.0,
        amin: float = 1e-10,
        top_db: float | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= fmin < fmax <= sample_rate / 2:
            raise ValueError(f"need 0 <= fmin < fmax <= sample_rate/2, got fmin={fmin}, fmax={fmax}, sample_rate={sample_rate}")
        self.sample_rate, self.window_size, self.hop_size = sample_rate, window_size, hop_size
        self.mel_bins, self.fmin, self.fmax = mel_bins, fmin, fmax
        self.amin, self.top_db = amin, top_db
        self.db_offset = 10.0 * math.log10(max(amin, ref))
        # librosa.filters.get_window("hann", n, fftbins=True) is the periodic Hann window.
        self.register_buffer("window", torch.hann_window(window_size, periodic=True), persistent=False)
        mel_fb = slaney_mel_filters(sample_rate, window_size, mel_bins, fmin, fmax)
        self.register_buffer("mel_fb", mel_fb, persistent=False)  # (freq_bins, mel_bins), torchlibrosa's melW layout

    def num_frames(self, num_samples: int) -> int:
        return 1 + num_samples // self.hop_size

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.shape[-1] <= self.window_size // 2:
            raise ValueError(
                f"a clip of {waveform.shape[-1]} samples is too short for window_size={self.window_size} "
                f"(reflect padding needs more than {self.window_size // 2}); pad clips to a fixed duration first."
            )
        with torch.autocast(device_type=waveform.device.type, enabled=False):  # log-mel in fp32 under bf16/fp16 training
            return self._log_mel(waveform.float())

    def _log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        power = torchaudio.functional.spectrogram(
            waveform,
            pad=0,
            window=self.window,
            n_fft=self.window_size,
            hop_length=self.hop_size,
            win_length=self.window_size,
            power=2.0,
            normalized=False,
            center=True,
            pad_mode="reflect",
            onesided=True,
        )  # (B, freq_bins, frames)
        mel = torch.matmul(power.transpose(-1, -2), self.mel_fb)  # (B, frames, mel_bins)
        log_mel: torch.Tensor = torchaudio.functional.amplitude_to_DB(mel, multiplier=10.0, amin=self.amin, db_multiplier=self.db_offset, top_db=None)
        if self.top_db is not None:
            log_mel = torch.maximum(log_mel, log_mel.amax() - self.top_db)  # torchlibrosa clamps over the whole batch
        return log_mel[:, None]


class SpecAugment(nn.Module):
    """PANNs' SpecAugmentation: per clip, ``time_stripes_num`` stripes of up to
    ``time_drop_width`` frames and ``freq_stripes_num`` stripes of up to
    ``freq_drop_width`` mel bins set to zero (the mean, after ``bn0``). Uses
    torchaudio's i.i.d. masking, on whatever device the spectrogram is on.
    Input and output ``(B, 1, frames, mel_bins)``; identity in eval mode."""

    def __init__(self, time_drop_width: int = 64, time_stripes_num: int = 2, freq_drop_width: int = 8, freq_stripes_num: int = 2) -> None:
        super().__init__()
        self.time_drop_width, self.time_stripes_num = time_drop_width, time_stripes_num
        self.freq_drop_width, self.freq_stripes_num = freq_drop_width, freq_stripes_num

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        for _ in range(self.time_stripes_num):
            x = torchaudio.functional.mask_along_axis_iid(x, min(self.time_drop_width, x.shape[2]), 0.0, axis=2)
        for _ in range(self.freq_stripes_num):
            x = torchaudio.functional.mask_along_axis_iid(x, min(self.freq_drop_width, x.shape[3]), 0.0, axis=3)
        return x


def mixup_lambdas(batch_size: int, alpha: float = 1.0, device: torch.device | str | None = None) -> torch.Tensor:
    """PANNs' mixup coefficients: for each pair of clips ``(2i, 2i+1)``, ``lam ~ Beta(alpha, alpha)``
    and ``(lam, 1 - lam)``. ``batch_size`` must be even; the mixed batch is half as large.
    Drawn from torch's global generator, so ``seed_everything`` makes it reproducible."""
    if batch_size % 2:
        raise ValueError(f"mixup pairs clips (0,1), (2,3), ...: the batch size must be even, got {batch_size}")
    lam = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha))).sample((batch_size // 2,))
    return torch.stack([lam, 1.0 - lam], dim=1).reshape(-1).to(device)


def do_mixup(x: torch.Tensor, mixup_lambda: torch.Tensor) -> torch.Tensor:
    """``x[0::2] * lam[0::2] + x[1::2] * lam[1::2]`` along the batch axis (PANNs' do_mixup)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    lam = mixup_lambda.to(x.dtype)
    return x[0::2] * lam[0::2].reshape(shape) + x[1::2] * lam[1::2].reshape(shape)
