"""DCASE's segment-based and event-based metrics (sed_eval's definitions) on hand-computed
examples, `polyfm test` of a sound event detection model on the events predict writes, and
file-grouped cross-validation folds of an event list."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf

from polyfm.audio.data import SoundEventDataModule
from polyfm.audio.models import Cnn14_DecisionLevelMax
from polyfm.audio.predict import AudioPredictionWriter
from polyfm.audio.tasks import SoundEventDetection, SoundEventMetrics, event_counts, segment_counts
from polyfm.core.errors import ConfigError


def test_segment_counts_by_hand() -> None:
    reference = [(0.0, 1.5, 0), (2.2, 2.8, 1)]  # class 0 in segments 0-1, class 1 in segment 2
    estimated = [(0.5, 0.9, 0), (2.9, 3.4, 1), (1.2, 1.4, 1)]  # 0 in 0; 1 in 2-3; 1 in 1
    # segment 0: hit; 1: ref {0} sys {1}, a substitution; 2: hit; 3: sys {1} alone, an insertion
    assert segment_counts(reference, estimated, num_classes=2) == {"tp": 2, "ref": 3, "sys": 4, "subs": 1, "dels": 0, "ins": 1}
    metrics = SoundEventMetrics(num_classes=2)
    metrics.update([reference, []], [estimated, []])  # a file with nothing in it changes nothing
    values = metrics.compute()
    assert math.isclose(float(values["segment_f1"]), 2 * 2 / (3 + 4), rel_tol=1e-6)
    assert math.isclose(float(values["segment_error_rate"]), (1 + 0 + 1) / 3, rel_tol=1e-6)


def test_event_counts_by_hand_collars_substitution_and_optimal_matching() -> None:
    reference = [
        (1.0, 2.0, 0),  # 1 s long: offset collar 200 ms
        (3.0, 8.0, 1),  # 5 s long: offset collar 20 % = 1 s
        (5.0, 5.5, 0),
        (10.0, 10.5, 0),
        (10.3, 10.8, 0),
    ]
    estimated = [
        (1.15, 2.1, 0),  # onset 150 ms, offset 100 ms off: a hit
        (3.1, 7.2, 1),  # offset 800 ms early: a hit only through the 20 % collar
        (5.0, 5.5, 1),  # the times of (5.0, 5.5, 0), the wrong class: a substitution
        (9.0, 9.5, 0),  # nothing there: an insertion
        (10.15, 10.65, 0),  # fits both events at 10 s; taken greedily by the first, the second would go unmatched
        (10.0, 10.4, 0),  # fits only the first
    ]
    counts = event_counts(reference, estimated)
    assert counts == {"tp": 4, "ref": 5, "sys": 6, "subs": 1, "fp": 1, "fn": 0}
    metrics = SoundEventMetrics(num_classes=2)
    metrics.update([reference], [estimated])
    values = metrics.compute()
    assert math.isclose(float(values["event_f1"]), 2 * 4 / (5 + 6), rel_tol=1e-6)
    assert math.isclose(float(values["event_error_rate"]), (1 + 1 + 0) / 5, rel_tol=1e-6)
    # the collars are inclusive, also where floats put 0.8 - 0.6 just above 0.2; 201 ms is outside
    assert event_counts([(0.6, 1.0, 0)], [(0.8, 1.0, 0)])["tp"] == 1
    assert event_counts([(0.6, 1.0, 0)], [(0.801, 1.0, 0)]) == {"tp": 0, "ref": 1, "sys": 1, "subs": 0, "fp": 1, "fn": 1}
    # no reference events: F1 0 (sed_eval), error rate undefined
    empty = SoundEventMetrics(num_classes=1)
    empty.update([[]], [[(0.0, 1.0, 0)]])
    assert float(empty.compute()["event_f1"]) == 0.0 and math.isnan(float(empty.compute()["event_error_rate"]))


def _wav(path: Path, seconds: float) -> None:
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(path, (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)


def _event_list(tmp_path: Path) -> Path:
    _wav(tmp_path / "a.wav", 2.0)
    _wav(tmp_path / "b.wav", 3.0)
    _wav(tmp_path / "c.wav", 2.0)
    rows = ["filename\tonset\toffset\tevent_label", "a.wav\t0.1\t1.9\tdog", "a.wav\t0.5\t0.9\tspeech", "b.wav\t0.0\t2.5\tdog", "c.wav\t\t\t"]
    (tmp_path / "events.tsv").write_text("\n".join(rows) + "\n")
    return tmp_path / "events.tsv"


def test_polyfm_test_scores_the_post_processed_events(tmp_path: Path) -> None:
    events = str(_event_list(tmp_path))
    data = SoundEventDataModule(events, test=events, clip_seconds=2.0, batch_size=2)
    task = SoundEventDetection(Cnn14_DecisionLevelMax(base_channels=4, classes_num=2), num_classes=2, threshold=0.0)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[AudioPredictionWriter(str(tmp_path / "p.csv"))])
    (result,) = trainer.test(task, data)
    # threshold 0: every clip has one event per class over [0, 2 s]. Events: a's dog hit; a's speech
    # (onset 0.5 s) missed; b's dog, cut at the clip's end to (0, 2.0), hit; 4 insertions (a and b
    # speech, c dog and speech). Segments: a 2 + 1 hits, 1 insertion; b 2 hits, 2 insertions; c 4 insertions.
    assert math.isclose(result["test/event_f1"], 2 * 2 / (3 + 6), rel_tol=1e-5)
    assert math.isclose(result["test/event_error_rate"], (0 + 4 + 1) / 3, rel_tol=1e-5)
    assert math.isclose(result["test/segment_f1"], 2 * 5 / (5 + 12), rel_tol=1e-5)
    assert math.isclose(result["test/segment_error_rate"], 7 / 5, rel_tol=1e-5)
    # the writer's post-processing applies: 2 s events under a 2.5 s minimum are dropped, nothing is detected
    dropping = AudioPredictionWriter(str(tmp_path / "p.csv"), min_event_seconds=2.5)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[dropping])
    (result,) = trainer.test(task, data)
    assert result["test/event_f1"] == 0.0 and result["test/segment_f1"] == 0.0 and result["test/event_error_rate"] == 1.0


def test_sed_folds_hold_each_file_out_once(tmp_path: Path) -> None:
    rows = ["filename\tonset\toffset\tevent_label"]
    for i in range(6):
        _wav(tmp_path / f"f{i}.wav", 0.2)
        rows += [f"f{i}.wav\t0.0\t0.1\tdog", f"f{i}.wav\t0.1\t0.2\t{'speech' if i % 2 else 'dog'}"]  # two rows per file
    (tmp_path / "events.tsv").write_text("\n".join(rows) + "\n")
    events = str(tmp_path / "events.tsv")
    held_out_once: Counter[str] = Counter()
    for fold in range(3):
        dm = SoundEventDataModule(events, fold=fold, num_folds=3, clip_seconds=0.2)
        dm.setup()
        train, held = [p.name for p in dm.train_set.paths], [p.name for p in dm.val_set.paths]
        assert dm.test_set is dm.val_set and len(held) == 2 and len(train) == 4 and not set(train) & set(held)
        assert dm.class_names == ["dog", "speech"]
        assert all(len(e) == 2 for e in dm.val_set.events_by_index)  # a file's events travel together
        held_out_once.update(held)
    assert held_out_once == Counter(f"f{i}.wav" for i in range(6))
    dm = SoundEventDataModule(events, test=events, fold=0, num_folds=3, clip_seconds=0.2)
    dm.setup()
    assert len(dm.test_set) == 6 and len(dm.val_set) == 2
    with pytest.raises(ConfigError, match=r"fold=1 holds out files of .*events.tsv as the validation split; leave val unset"):
        SoundEventDataModule(events, val=events, fold=1)
    with pytest.raises(ConfigError, match=r"6 groups cannot fill 7 folds"):
        SoundEventDataModule(events, fold=0, num_folds=7).setup()
