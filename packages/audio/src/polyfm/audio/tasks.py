"""Sound event detection fine-tuning (the audio task polyfm.core has no generic form of).

:class:`SoundEventDetection` puts a new per-segment classifier on a decision-level
encoder (:class:`~polyfm.audio.models.Cnn14_DecisionLevelMax`): segment logits from the
encoder's ``segment_embedding``, the clip logit is their maximum, and frame outputs are
interpolated to the log-mel frame rate exactly as PANNs does. It trains on strong labels
(``target`` ``(B, frames, classes)``, 0/1 per frame; NaN = unknown) or weak labels
(``target`` ``(B, classes)``: clip-level tags only, multiple-instance learning through the
max). Metrics: frame-level F1 (micro, ``threshold``), frame-level and clip-level mAP; in
``test`` also DCASE's segment-based and event-based F1 and error rate (sed_eval's definitions,
:class:`SoundEventMetrics`) of the post-processed events ``predict`` writes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from polyfm.audio.chunked import ChunkedInput
from polyfm.audio.models.cnn14_decision_level_max import interpolate, pad_framewise_output
from polyfm.audio.predict import TIME_TOLERANCE, AudioPredictionWriter, event_runs
from polyfm.core.adaptation import Adaptation
from polyfm.core.tasks import EncoderTask, OptimConfig


def frame_f1(probabilities: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Frame-level micro F1 over ``(B, frames, classes)`` (DCASE's frame-based F-score)."""
    from torchmetrics.functional.classification import multilabel_f1_score

    classes = probabilities.shape[-1]
    return multilabel_f1_score(probabilities.reshape(-1, classes), target.reshape(-1, classes).long(), classes, threshold=threshold, average="micro")


Event = tuple[float, float, int]  # onset seconds, offset seconds, class index


def segment_counts(reference: Sequence[Event], estimated: Sequence[Event], num_classes: int, segment_seconds: float = 1.0) -> dict[str, int]:
    """sed_eval's segment-based counts for one file: an event marks segments ``floor(onset / s)``
    up to ``ceil(offset / s)`` (exclusive) of its class active; per segment, ``tp`` = classes
    active in both, and substitutions ``min(ref, sys) - tp``, deletions ``max(0, ref - sys)``,
    insertions ``max(0, sys - ref)`` (the error rate's terms)."""
    events = [*reference, *estimated]
    segments = max((math.ceil(offset / segment_seconds) for _, offset, _ in events), default=0)
    rolls = np.zeros((2, segments, num_classes), dtype=bool)
    for roll, listed in zip(rolls, (reference, estimated), strict=True):
        for onset, offset, cls in listed:
            roll[math.floor(onset / segment_seconds) : math.ceil(offset / segment_seconds), cls] = True
    ref, sys = rolls[0].sum(axis=1), rolls[1].sum(axis=1)
    tp = (rolls[0] & rolls[1]).sum(axis=1)
    return {"tp": int(tp.sum()), "ref": int(ref.sum()), "sys": int(sys.sum()), "subs": int((np.minimum(ref, sys) - tp).sum()),
            "dels": int(np.maximum(0, ref - sys).sum()), "ins": int(np.maximum(0, sys - ref).sum())}


def _times_match(ref: Event, est: Event, t_collar: float, percentage_of_length: float) -> bool:
    """sed_eval's onset and offset conditions (labels not compared): the onsets within
    ``t_collar``, the offsets within ``max(t_collar, percentage_of_length * reference length)``."""
    onset_ok = abs(ref[0] - est[0]) <= t_collar + TIME_TOLERANCE  # 0.8 - 0.6 is 0.2000000000000001 in floats
    return bool(onset_ok and abs(ref[1] - est[1]) <= max(t_collar, percentage_of_length * (ref[1] - ref[0])) + TIME_TOLERANCE)


def _maximum_matching(edges: Sequence[Sequence[int]], right: int) -> list[int]:
    """A maximum bipartite matching (augmenting paths found breadth first, no recursion):
    ``matched[j]`` is the left vertex matched to right vertex ``j``, -1 for none."""
    match_right, match_left = [-1] * right, [-1] * len(edges)
    for start in range(len(edges)):
        parent: dict[int, int] = {}
        queue, head, found = [start], 0, -1
        while head < len(queue) and found < 0:
            left = queue[head]
            head += 1
            for j in edges[left]:
                if j in parent:
                    continue
                parent[j] = left
                if match_right[j] < 0:
                    found = j
                    break
                queue.append(match_right[j])
        while found >= 0:  # flip the path's edges
            left = parent[found]
            previous = match_left[left]
            match_right[found], match_left[left] = left, found
            found = previous if left != start else -1
    return match_right


def event_counts(reference: Sequence[Event], estimated: Sequence[Event], t_collar: float = 0.2, percentage_of_length: float = 0.2) -> dict[str, int]:
    """sed_eval's event-based counts for one file (``EventBasedMetrics`` with onset and offset
    evaluated, optimal matching): ``tp`` = the largest one-to-one matching of reference and
    estimated events of the same class whose times match (:func:`_times_match`); then each
    unmatched reference takes the first unmatched estimate whose times match, whatever its
    class, as a substitution; ``fp`` / ``fn`` = the estimates / references left."""
    edges = [[i for i, est in enumerate(estimated) if est[2] == ref[2] and _times_match(ref, est, t_collar, percentage_of_length)] for ref in reference]
    matched = _maximum_matching(edges, len(estimated))
    tp = sum(m >= 0 for m in matched)
    ref_used, sys_used = {m for m in matched if m >= 0}, {i for i, m in enumerate(matched) if m >= 0}
    subs = 0
    for j, ref in enumerate(reference):
        if j in ref_used:
            continue
        for i, est in enumerate(estimated):
            if i not in sys_used and _times_match(ref, est, t_collar, percentage_of_length):
                sys_used.add(i)
                subs += 1
                break
    return {"tp": tp, "ref": len(reference), "sys": len(estimated), "subs": subs, "fp": len(estimated) - tp - subs, "fn": len(reference) - tp - subs}


class SoundEventMetrics(torchmetrics.Metric):
    """DCASE's segment-based and event-based scores over files, micro-averaged (counts summed
    over files and classes, then one F1 = ``2 tp / (ref + sys)``, 0 when both are 0, and one
    error rate = ``(substitutions + deletions + insertions) / ref``, NaN without reference
    events), as sed_eval's ``overall`` results: ``segment_f1``, ``segment_error_rate`` (1 s
    segments), ``event_f1``, ``event_error_rate`` (200 ms onset collar, offset collar
    ``max(200 ms, 20 %`` of the reference event's length)). Counts are summed across processes."""

    full_state_update = False

    def __init__(self, num_classes: int, segment_seconds: float = 1.0, t_collar: float = 0.2, percentage_of_length: float = 0.2) -> None:
        super().__init__()
        self.num_classes, self.segment_seconds, self.t_collar, self.percentage_of_length = num_classes, segment_seconds, t_collar, percentage_of_length
        self.segment_keys, self.event_keys = ("tp", "ref", "sys", "subs", "dels", "ins"), ("tp", "ref", "sys", "subs", "fp", "fn")
        for key in (*(f"segment_{k}" for k in self.segment_keys), *(f"event_{k}" for k in self.event_keys)):
            self.add_state(key, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, reference: Sequence[Sequence[Event]], estimated: Sequence[Sequence[Event]]) -> None:
        """One list of ``(onset, offset, class)`` per file, reference and estimated alike."""
        if len(reference) != len(estimated):
            raise ValueError(f"SoundEventMetrics: {len(reference)} reference files but {len(estimated)} estimated")
        for ref, est in zip(reference, estimated, strict=True):
            for prefix, counts in (("segment", segment_counts(ref, est, self.num_classes, self.segment_seconds)),
                                   ("event", event_counts(ref, est, self.t_collar, self.percentage_of_length))):
                for key, value in counts.items():
                    state = getattr(self, f"{prefix}_{key}")
                    setattr(self, f"{prefix}_{key}", state + value)

    def compute(self) -> dict[str, torch.Tensor]:
        def f1(tp: torch.Tensor, ref: torch.Tensor, sys: torch.Tensor) -> torch.Tensor:
            total = (ref + sys).double()
            return torch.where(total > 0, 2 * tp.double() / total.clamp(min=1), torch.zeros((), dtype=torch.float64))

        def error_rate(errors: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
            return errors.double() / ref.double() if ref > 0 else torch.tensor(float("nan"), dtype=torch.float64)

        s = {k: getattr(self, f"segment_{k}") for k in self.segment_keys}
        e = {k: getattr(self, f"event_{k}") for k in self.event_keys}
        return {
            "segment_f1": f1(s["tp"], s["ref"], s["sys"]).float(),
            "segment_error_rate": error_rate(s["subs"] + s["dels"] + s["ins"], s["ref"]).float(),
            "event_f1": f1(e["tp"], e["ref"], e["sys"]).float(),
            "event_error_rate": error_rate(e["subs"] + e["fp"] + e["fn"], e["ref"]).float(),
        }


def clip_events(events: Sequence[Event], end: float) -> list[Event]:
    """The events inside ``[0, end)`` with offsets cut at ``end``: what a clip of that length holds."""
    return [(float(onset), min(float(offset), end), int(cls)) for onset, offset, cls in events if onset < end]


def align_frames(target: torch.Tensor, frames: int) -> torch.Tensor:
    """Nearest-neighbour resampling of a frame target ``(B, T, C)`` to ``frames`` steps."""
    if target.shape[1] == frames:
        return target
    return F.interpolate(target.transpose(1, 2), size=frames, mode="nearest").transpose(1, 2)


class SoundEventDetection(EncoderTask):
    """Fine-tune a decision-level PANNs encoder for frame-wise event detection."""

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        adaptation: Adaptation | None = None,
        optim: OptimConfig | None = None,
        class_names: list[str] | None = None,
        threshold: float = 0.5,
    ) -> None:
        super().__init__(encoder, adaptation, optim)
        self.save_hyperparameters(ignore=["encoder"])
        self.num_classes, self.class_names, self.threshold = num_classes, class_names, threshold
        self.head = nn.Linear(self.encoder.feature_dim, num_classes)  # as core's Classification: the adapted encoder (Any)
        self.metrics = nn.ModuleDict(
            {
                stage: torchmetrics.MetricCollection(
                    {
                        "frame_f1": torchmetrics.classification.MultilabelF1Score(num_classes, threshold=threshold, average="micro", ignore_index=-1),
                        "frame_map": torchmetrics.classification.MultilabelAveragePrecision(num_classes, average="macro", ignore_index=-1),
                    }
                )
                for stage in ("val_", "test_")
            }
        )
        self.event_metrics = SoundEventMetrics(num_classes)

    def encoder_base(self) -> Any:
        """The PANNs model itself (under PEFT's wrapper with LoRA): sample rate, hop, frames."""
        return getattr(self.encoder, "base_model", self.encoder)

    def forward(self, waveform: torch.Tensor | ChunkedInput) -> dict[str, torch.Tensor]:
        """``framewise_logits`` ``(B, frames, C)`` and ``clip_logits`` ``(B, C)``; ``waveform`` may be
        a :class:`~polyfm.audio.chunked.ChunkedInput` (chunked prediction: whole files' outputs)."""
        base = self.encoder_base()
        out = self.encoder(waveform)
        if "segment_embedding" not in out:
            raise TypeError(f"{type(base).__name__} has no segment output; SED needs a decision-level model such as Cnn14_DecisionLevelMax.")
        segment_logits = self.head(out["segment_embedding"])
        frames = base.input_frames(waveform)  # a waveform's, or a chunked input's whole files'
        framewise = pad_framewise_output(interpolate(segment_logits, base.interpolate_ratio), frames)
        return {"framewise_logits": framewise, "clip_logits": segment_logits.amax(dim=1)}

    def loss(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if target.dim() == 2:  # weak labels
            logits = out["clip_logits"]
        else:
            logits = out["framewise_logits"]
            target = align_frames(target, logits.shape[1])
        observed = ~torch.isnan(target)
        losses = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(target), reduction="none")
        return (losses * observed).sum() / observed.sum().clamp(min=1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch["input"]), batch["target"])
        return self.log_train_loss(loss, batch, batch_idx, len(batch["target"]))

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        out = self(batch["input"])
        target = batch["target"]
        self.log(f"{stage}/loss", self.loss(out, target), batch_size=len(target), sync_dist=True)
        if target.dim() == 3:
            target = align_frames(target, out["framewise_logits"].shape[1])
            probs = torch.sigmoid(out["framewise_logits"]).reshape(-1, self.num_classes)
            metrics = cast(torchmetrics.MetricCollection, self.metrics[f"{stage}_"])  # ModuleDict items are typed Module
            metrics.update(probs, torch.nan_to_num(target, nan=-1).reshape(-1, self.num_classes).long())
            self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, batch_size=len(target))
            if stage == "test":
                self._score_events(batch, out, target)

    def _score_events(self, batch: dict[str, Any], out: dict[str, torch.Tensor], target: torch.Tensor) -> None:
        """Events of each clip, post-processed as ``predict`` writes them (the trainer's
        :class:`~polyfm.audio.predict.AudioPredictionWriter`, else ``threshold`` alone), scored
        against the batch's ``events`` (the event list, cut to the clip), else against runs of
        the frame target."""
        base = self.encoder_base()
        hop_seconds = base.frontend.hop_size / base.sample_rate
        end = base.as_waveform(batch["input"]).shape[-1] / base.sample_rate
        probabilities = torch.sigmoid(out["framewise_logits"]).float().cpu()
        writer = next((c for c in self.trainer.callbacks if isinstance(c, AudioPredictionWriter)), None)  # type: ignore[attr-defined]
        if writer is not None:
            names, threshold = writer.class_names(self.trainer, self, self.num_classes), writer.threshold_for(self)
            runs = [writer.post_process(self, clip, names, threshold, end) for clip in probabilities]
        else:
            runs = [event_runs(clip, hop_seconds, self.threshold, end) for clip in probabilities]
        estimated = [[(r.onset, r.offset, r.cls) for r in clip] for clip in runs]
        if "events" in batch:
            reference = [clip_events(events, end) for events in batch["events"]]
        else:
            frames = torch.nan_to_num(target, nan=0.0).float().cpu()
            reference = [[(r.onset, r.offset, r.cls) for r in event_runs(clip, hop_seconds, 0.5, end)] for clip in frames]
        self.event_metrics.update(reference, estimated)

    def on_test_epoch_end(self) -> None:
        if self.event_metrics.update_called:
            self.log_dict({f"test/{k}": v for k, v in self.event_metrics.compute().items()})
        self.event_metrics.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        out = self(batch["input"])
        return {
            "framewise_output": torch.sigmoid(out["framewise_logits"]),
            "clipwise_output": torch.sigmoid(out["clip_logits"]),
            "meta": batch.get("meta"),
        }
