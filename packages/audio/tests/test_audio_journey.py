"""The user's path end to end: the recipes through the CLI (fit, predict to a CSV, resume
from last.ckpt), the prediction files, and every Python block of docs/audio.md as written."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

import polyfm.audio
from polyfm.audio.data import read_events_csv, read_predict_source
from polyfm.audio.predict import detect_events
from polyfm.core.cli import main as polyfm_cli
from polyfm.core.errors import DataError

RECIPES = Path(polyfm.audio.__file__).parent / "recipes"
DOC = Path(__file__).resolve().parents[3] / "docs" / "audio.md"
README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = ["--data.init_args.num_workers=0", "--data.init_args.batch_size=4", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"]


def _tone(path: Path, freq: float, seconds: float = 0.4, rate: int = 16000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    noise = 0.01 * np.random.default_rng(int(freq)).standard_normal(len(t))
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32), rate)


def _clips(root: Path, per_class: int = 2) -> Path:
    for label, freq in (("high", 3000.0), ("low", 300.0)):
        for i in range(per_class):
            _tone(root / label / f"{label}{i}.wav", freq + 10 * i)
    return root


def _rows(path: Path, delimiter: str = ",") -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter=delimiter))


def test_every_recipe_saves_last_ckpt_and_finetuning_recipes_write_predictions() -> None:
    """Resuming needs last.ckpt (Lightning's default keeps only epoch=...ckpt)."""
    for recipe in sorted(RECIPES.glob("*.yaml")):
        callbacks = yaml.safe_load(recipe.read_text())["trainer"].get("callbacks") or []
        paths = {c["class_path"]: c.get("init_args") or {} for c in callbacks}
        assert paths.get("lightning.pytorch.callbacks.ModelCheckpoint", {}).get("save_last") is True, recipe.name
        if recipe.name.startswith("finetune"):
            assert "polyfm.audio.predict.AudioPredictionWriter" in paths, recipe.name


def test_folder_recipe_fit_predict_csv_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/audio.md's CLI path: fit, then predict on new files with the run's config.yaml and
    last.ckpt (one CSV row per file, class names as columns, the file's own rate), then resume."""
    monkeypatch.chdir(tmp_path)
    _clips(tmp_path / "clips")
    _tone(tmp_path / "new" / "b.wav", 3000.0, seconds=0.7, rate=8000)
    _tone(tmp_path / "new" / "sub" / "a.wav", 300.0)
    model = ["--model.init_args.encoder.init_args.pretrained=", "--model.init_args.encoder.init_args.base_channels=4"]
    data = ["--data.init_args.train=clips", "--data.init_args.val=clips", "--data.init_args.clip_seconds=0.5"]
    polyfm_cli(["fit", "--config", str(RECIPES / "finetune-folder.yaml"), *model, *data, *SMALL, "--trainer.max_steps=1"])
    run = tmp_path / "runs/audio-folder/logs/version_0"
    assert (run / "checkpoints/last.ckpt").is_file()

    polyfm_cli(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints/last.ckpt"), "--data.init_args.predict=new"])
    rows = _rows(tmp_path / "runs/audio-folder/predictions/predictions.csv")
    assert [r["file"] for r in rows] == ["new/b.wav", "new/sub/a.wav"]  # sorted, sub-folders included
    assert list(rows[0])[:5] == ["file", "prediction", "probability", "duration_s", "sample_rate"]
    assert (rows[0]["sample_rate"], rows[0]["duration_s"]) == ("8000", "0.7") and rows[1]["sample_rate"] == "16000"
    for row in rows:
        probabilities = {name: float(row[name]) for name in ("high", "low")}
        assert abs(sum(probabilities.values()) - 1) < 1e-4
        assert row["prediction"] == max(probabilities, key=probabilities.__getitem__)
        assert float(row["probability"]) == max(probabilities.values())

    polyfm_cli(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints/last.ckpt"), "--trainer.max_steps=2"])
    resumed = torch.load(tmp_path / "runs/audio-folder/logs/version_2/checkpoints/last.ckpt", weights_only=True)
    assert resumed["global_step"] == 2  # one more step on top of the restored one


def test_sed_recipe_predicts_a_dcase_event_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """finetune-sed.yaml: predict writes clip tags and an event list that read_events_csv reads back."""
    monkeypatch.chdir(tmp_path)
    clips = _clips(tmp_path / "clips", per_class=1)
    (tmp_path / "events.tsv").write_text("filename\tonset\toffset\tevent_label\nlow/low0.wav\t0.1\t0.3\tlow\nhigh/high0.wav\t0.0\t0.4\thigh\n")
    options = [
        "--model.init_args.encoder.init_args.pretrained=", "--model.init_args.encoder.init_args.base_channels=4",
        "--model.init_args.num_classes=2", "--data.init_args.train=events.tsv", f"--data.init_args.audio_root={clips}",
        "--data.init_args.val=null", "--data.init_args.clip_seconds=0.5", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
        "--model.init_args.threshold=0.0",  # every frame active: one event per class, cut at the file's end
    ]  # fmt: skip
    polyfm_cli(["fit", "--config", str(RECIPES / "finetune-sed.yaml"), *options, *SMALL])
    run = tmp_path / "runs/audio-sed/logs/version_0"
    polyfm_cli(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints/last.ckpt"), f"--data.init_args.predict={clips / 'low'}"])
    out = tmp_path / "runs/audio-sed/predictions"
    (row,) = _rows(out / "predictions.csv")
    assert row["labels"] == "high;low" and row["file"].endswith("low0.wav")
    paths, events, classes = read_events_csv(out / "predictions_events.tsv")
    assert classes == ["high", "low"] and paths == [clips / "low" / "low0.wav"]
    assert sorted(events[0]) == [(0.0, 0.4, 0), (0.0, 0.4, 1)]

    # polyfm test scores those events: both classes over each 0.5 s clip, each file's one reference event
    # within the collars (low0's offset 0.3 vs 0.5: 200 ms), so 2 hits of 2 references and 4 estimates
    polyfm_cli(["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints/last.ckpt"), "--data.init_args.test=events.tsv"])
    (scores,) = [r for r in _rows(tmp_path / "runs/audio-sed/logs/version_2/metrics.csv") if r.get("test/event_f1")]
    assert float(scores["test/event_f1"]) == pytest.approx(2 * 2 / (2 + 4)) and float(scores["test/event_error_rate"]) == pytest.approx(1.0)

    # the post-processing arguments from the command line, as docs/audio.md shows them: 0.4 s events under a 0.5 s minimum go
    post = ["--trainer.callbacks.init_args.median_filter_seconds=0.05", "--trainer.callbacks.init_args.min_event_seconds=0.5",
            f"--trainer.callbacks.init_args.output={tmp_path / 'post.csv'}"]
    polyfm_cli(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints/last.ckpt"), f"--data.init_args.predict={clips / 'low'}", *post])
    assert [(r["filename"], r["onset"], r["event_label"]) for r in _rows(tmp_path / "post_events.tsv", "\t")] == [(str(clips / "low" / "low0.wav"), "", "")]


def test_detect_events_runs_of_frames() -> None:
    framewise = torch.zeros(10, 2)
    framewise[2:5, 0] = 0.9
    framewise[8:, 0] = 0.7
    framewise[0, 1] = 0.6
    events = detect_events(framewise, 0.01, ["dog", "cat"], threshold=0.5, end=0.095)
    assert events == [(0.0, 0.01, "cat"), (0.02, 0.05, "dog"), (0.08, 0.095, "dog")]


def test_predict_source_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere.*give an audio file, a folder of them or a CSV manifest"):
        read_predict_source(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty.*no audio files"):
        read_predict_source(tmp_path / "empty")
    (tmp_path / "list.csv").write_text("file\nmissing.wav\n")
    with pytest.raises(DataError, match=r"list.csv.*row 2.*missing.wav"):
        read_predict_source(tmp_path / "list.csv")


def _small_from_pretrained(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registry names: a narrow random model with the registry's configuration (no download);
    a file you downloaded: the real loader on a narrow checkpoint written in PANNs' layout."""
    from polyfm.audio.models.base import PannsModel
    from polyfm.core.weights import get_weights

    original = PannsModel.from_pretrained.__func__  # type: ignore[attr-defined]

    def from_pretrained(cls: Any, name_or_path: Any, **config: Any) -> Any:
        if Path(name_or_path).exists():
            return original(cls, name_or_path, base_channels=4, **config)
        return cls(base_channels=4, **{**dict(get_weights(str(name_or_path)).config), **config})

    monkeypatch.setattr(PannsModel, "from_pretrained", classmethod(from_pretrained))


def test_docs_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ```python block of docs/audio.md and the package README, as written, in a folder holding the files they name
    (20 epochs become 1; pretrained weights are narrow stand-ins, see _small_from_pretrained)."""
    from polyfm.audio import Cnn14, Cnn14_16k
    from polyfm.audio.weights import to_panns_state_dict

    monkeypatch.chdir(tmp_path)
    _small_from_pretrained(monkeypatch)
    for name, model in {
        "Cnn14_mAP=0.431.pth": Cnn14(base_channels=4),
        "Cnn14_16k_mAP=0.438.pth": Cnn14_16k(base_channels=4),
        "Cnn14_emb512_mAP=0.420.pth": Cnn14(base_channels=4, embedding_size=512),
    }.items():
        torch.save({"model": to_panns_state_dict(model)}, tmp_path / name)
    for split in ("train", "val"):
        _clips(tmp_path / "clips" / split)
    _tone(tmp_path / "new_clips" / "x.wav", 300.0)
    _tone(tmp_path / "R9_ZSCveAHg_7s.wav", 1000.0, seconds=1.0, rate=32000)
    _tone(tmp_path / "clip.wav", 500.0, seconds=0.5, rate=44100)
    (tmp_path / "class_labels_indices.csv").write_text("index,mid,display_name\n" + "".join(f'{i},/m/{i},"class {i}"\n' for i in range(527)))

    for doc in (DOC, README):
        blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
        assert len(blocks) >= (3 if doc == DOC else 1)
        for block in blocks:
            scope: dict[str, Any] = {}
            exec(compile(block.replace("max_epochs=20", "max_epochs=1"), str(doc), "exec"), scope)
    assert scope["out"]["clipwise_output"].shape == (1, 527)  # the README's tagging of clip.wav
    rows = _rows(tmp_path / "predictions.csv")
    assert [r["file"] for r in rows] == ["new_clips/x.wav"] and rows[0]["prediction"] in ("high", "low")
    assert (tmp_path / "sed.png").stat().st_size > 0


def test_pretrain_recipe_checkpoint_starts_the_finetuning_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pretrain-ssl-folder.yaml's last.ckpt as finetune-folder.yaml's ``pretrained=``: the
    encoder starts from the pretrained weights (it was refused: keys carry 'model.')."""
    from polyfm.audio import Cnn14

    monkeypatch.chdir(tmp_path)
    _clips(tmp_path / "clips")
    ssl = ["--data.init_args.source=clips/low", "--data.init_args.clip_seconds=0.4", "--data.init_args.val_fraction=0", "--trainer.max_steps=1"]
    ssl += ["--model.init_args.model.init_args.base_channels=4", "--model.init_args.objective.init_args.feature_dim=128"]
    polyfm_cli(["fit", "--config", str(RECIPES / "pretrain-ssl-folder.yaml"), *ssl, *SMALL])
    ckpt = tmp_path / "runs/audio-ssl/logs/version_0/checkpoints/last.ckpt"
    pretrained = {k[len("model.") :]: v for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items() if k.startswith("model.")}
    model = Cnn14(base_channels=4, pretrained=str(ckpt))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, pretrained[key], msg=key)

    encoder = [f"--model.init_args.encoder.init_args.pretrained={ckpt}", "--model.init_args.encoder.init_args.base_channels=4"]
    data = ["--data.init_args.train=clips", "--data.init_args.clip_seconds=0.4", "--trainer.max_steps=1"]
    polyfm_cli(["fit", "--config", str(RECIPES / "finetune-folder.yaml"), *encoder, *data, *SMALL])
    assert (tmp_path / "runs/audio-folder/logs/version_0/checkpoints/last.ckpt").is_file()
