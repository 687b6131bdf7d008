"""Cnn14_DecisionLevelMax (PANNs' sound event detection model): the Cnn14 trunk, then
per-segment predictions instead of clip pooling. After the conv blocks, the map is
averaged over frequency, smoothed over time (max-pool + avg-pool, width 3), passed
frame by frame through ``fc1`` and ``fc_audioset``; the clip output is the maximum
over segments. ``framewise_output`` repeats each segment 32 times (the trunk's time
down-sampling) and pads with the last value to the log-mel frame count, as PANNs'
``interpolate`` + ``pad_framewise_output``. Keys are Cnn14's; released checkpoint
``Cnn14_DecisionLevelMax_mAP=0.385.pth``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polyfm.audio.chunked import ChunkedInput
from polyfm.audio.models.cnn14 import Cnn14


def interpolate(x: torch.Tensor, ratio: int) -> torch.Tensor:
    """Repeat each time step ``ratio`` times: ``(B, T, C)`` -> ``(B, T * ratio, C)``."""
    return torch.repeat_interleave(x, ratio, dim=1)


def pad_framewise_output(framewise_output: torch.Tensor, frames_num: int) -> torch.Tensor:
    """Pad ``(B, T, C)`` to ``frames_num`` steps with copies of the last step."""
    missing = frames_num - framewise_output.shape[1]
    if missing <= 0:
        return framewise_output[:, :frames_num]
    return torch.cat([framewise_output, framewise_output[:, -1:].expand(-1, missing, -1)], dim=1)


def repeat_to_frames(x: torch.Tensor, ratio: int, frames_num: int) -> torch.Tensor:
    """``pad_framewise_output(interpolate(x, ratio), frames_num)`` in one allocation: frame ``i`` is
    step ``min(i // ratio, T - 1)`` of ``(B, T, C)``. A chunked hour's 527-class output is 760 MB;
    repeating, then padding held it twice."""
    index = torch.clamp(torch.arange(frames_num, device=x.device) // ratio, max=x.shape[1] - 1)
    return x.index_select(1, index)


class Cnn14_DecisionLevelMax(Cnn14):  # noqa: N801 - PANNs' own class name
    """Sound event detection with Cnn14. ``forward`` returns ``framewise_output``
    ``(B, frames, classes)``, ``clipwise_output`` (max over segments), ``segmentwise_output``,
    ``embedding`` (segment embeddings max-pooled over time, for linear probes) and
    ``segment_embedding`` ``(B, segments, feature_dim)``. Arguments as Cnn14."""

    family = "cnn14_decision_level_max"
    #: time down-sampling of the trunk (five 2x2 poolings)
    interpolate_ratio = 32

    def segment_features(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk output smoothed over time: ``(B, 1, T, F)`` -> ``(B, segments, channels)``."""
        return self.smooth_segments(torch.mean(self.trunk(x), dim=3))

    def smooth_segments(self, x: torch.Tensor) -> torch.Tensor:
        """A time map ``(B, C, segments)`` smoothed over time (max-pool + avg-pool, width 3) -> ``(B, segments, C)``."""
        x = F.max_pool1d(x, kernel_size=3, stride=1, padding=1) + F.avg_pool1d(x, kernel_size=3, stride=1, padding=1)
        x = F.dropout(x, p=self.head_dropout, training=self.training)
        return x.transpose(1, 2)

    def forward(self, input: torch.Tensor | ChunkedInput, mixup_lambda: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if isinstance(input, ChunkedInput):  # a long file, chunk by chunk (chunked prediction)
            return self.forward_chunked(input)
        x = self.log_mel(self.as_waveform(input))
        frames_num = x.shape[2]
        x = self.augment(x, mixup_lambda)
        return self.head_from_map(torch.mean(self.trunk(x), dim=3), frames_num)

    def head_from_map(self, x: torch.Tensor, frames: int) -> dict[str, torch.Tensor]:
        """The segment head on a time map ``(B, C, segments)``; frames repeat segments up to ``frames``."""
        frames_num = frames
        x = torch.relu(self.fc1(self.smooth_segments(x)))
        segment_embedding = F.dropout(x, p=self.head_dropout, training=self.training)
        segment_logits = self.fc_audioset(segment_embedding)
        segmentwise_output = torch.sigmoid(segment_logits)
        clipwise_output = torch.amax(segmentwise_output, dim=1)
        framewise_output = repeat_to_frames(segmentwise_output, self.interpolate_ratio, frames_num)
        return {
            "framewise_output": framewise_output,
            "clipwise_output": clipwise_output,
            "segmentwise_output": segmentwise_output,
            "logits": torch.amax(segment_logits, dim=1),
            "embedding": torch.amax(segment_embedding, dim=1),
            "segment_embedding": segment_embedding,
        }
