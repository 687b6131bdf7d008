"""Peak memory of ``polyfm predict`` (or ``tag_file``) on one long recording, whole file vs chunked.

Writes a synthetic recording (noise with a 1 kHz tone every minute, 16-bit PCM WAV) to a
temporary folder, then runs ``trainer.predict`` with :class:`AudioPredictionWriter` on a
random-weight ``Cnn14_DecisionLevelMax`` (full width unless ``--base-channels``) once per
mode, each in a fresh process, and prints each one's peak resident memory (``ru_maxrss``),
the memory after building the model (the baseline), the wall time, the number of events and,
for each chunked run, the largest difference of its framewise output from the whole file's and
whether the event lists are equal::

    OMP_NUM_THREADS=1 .venv/bin/python packages/audio/scripts/long_file_memory.py --minutes 10 --chunk-seconds 60

``--task cnn14`` predicts with a clip model instead (``Classification(Cnn14)``, multi-label, no
frames: the chunks' time maps are stitched before its pooling and head), comparing the clip outputs.

``--api tag_file`` measures :func:`polyfm.audio.inference.tag_file` (``chunk_seconds``) instead of
``trainer.predict``, comparing the framewise and clip outputs (there is no event list).

No timing or memory figure here is asserted by a test (they depend on the machine).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RATE = 32000


def write_recording(path: Path, minutes: float) -> None:
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    with sf.SoundFile(str(path), "w", RATE, 1, "PCM_16") as handle:  # a minute at a time: the writer holds no whole waveform
        for minute in range(int(np.ceil(minutes))):
            samples = int(RATE * min(60.0, minutes * 60 - minute * 60))
            t = np.arange(samples) / RATE
            signal = 0.05 * rng.standard_normal(samples) + 0.5 * np.sin(2 * np.pi * 1000 * t) * ((t >= 20) & (t < 23))
            handle.write(signal.astype(np.float32))


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def run_one(folder: Path, chunk_seconds: float | None, base_channels: int, task_name: str = "sed") -> dict[str, float | int | None]:
    import lightning as L
    import numpy as np
    import torch

    from polyfm.audio.data import AudioClipsDataModule
    from polyfm.audio.models import Cnn14, Cnn14_DecisionLevelMax
    from polyfm.audio.predict import AudioPredictionWriter
    from polyfm.audio.tasks import SoundEventDetection
    from polyfm.core.tasks import Classification

    out = folder / f"out-{chunk_seconds}"

    class KeepFrames(AudioPredictionWriter):
        """Also saves the file's clip and (stitched) framewise outputs, to compare the modes."""

        def add_file(self, trainer: Any, pl_module: Any, kind: str, index: int, file: str, scores: Any, spread: Any,
                     framewise: Any, framewise_spread: Any) -> None:
            super().add_file(trainer, pl_module, kind, index, file, scores, spread, framewise, framewise_spread)
            out.mkdir(parents=True, exist_ok=True)
            np.save(out / "clipwise.npy", scores.numpy())
            if framewise is not None:
                np.save(out / "framewise.npy", framewise.numpy())

    torch.set_num_threads(1)
    torch.manual_seed(0)
    names = [f"c{i}" for i in range(10)]
    if task_name == "cnn14":
        task: Any = Classification(Cnn14(base_channels=base_channels), num_classes=10, multilabel=True, class_names=names).eval()
    else:
        task = SoundEventDetection(Cnn14_DecisionLevelMax(base_channels=base_channels), num_classes=10, class_names=names).eval()
    data = AudioClipsDataModule(train=str(folder / "train"), predict=str(folder / "recording"), format="folder", clip_seconds=1.0,
                                batch_size=1, predict_chunk_seconds=chunk_seconds)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=out, callbacks=[KeepFrames(threshold=0.5)])
    baseline = peak_mb()
    start = time.perf_counter()
    trainer.predict(task, datamodule=data, return_predictions=False)
    seconds = time.perf_counter() - start
    events_file = out / "predictions" / "predictions_events.tsv"
    events = events_file.read_text().count("\n") - 1 if events_file.exists() else None
    return {"task": task_name, "chunk_seconds": chunk_seconds, "baseline_mb": round(baseline), "peak_mb": round(peak_mb()), "seconds": round(seconds, 1), "events": events}


def run_tag_file(folder: Path, chunk_seconds: float | None, base_channels: int) -> dict[str, float | int | None]:
    import numpy as np
    import torch

    from polyfm.audio.inference import tag_file
    from polyfm.audio.models import Cnn14_DecisionLevelMax

    out = folder / f"out-{chunk_seconds}"
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Cnn14_DecisionLevelMax(base_channels=base_channels, classes_num=10).eval()
    baseline = peak_mb()
    start = time.perf_counter()
    result = tag_file(model, folder / "recording" / "long.wav", chunk_seconds=chunk_seconds)
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "framewise.npy", result["output"]["framewise_output"][0].numpy())
    np.save(out / "clipwise.npy", result["output"]["clipwise_output"][0].numpy())
    return {"api": "tag_file", "chunk_seconds": chunk_seconds, "baseline_mb": round(baseline), "peak_mb": round(peak_mb()), "seconds": round(seconds, 1)}


def compare(folder: Path, chunk: str) -> dict[str, float | bool]:
    """The chunked run's clip and framewise outputs and event list against the whole file's."""
    import numpy as np

    found: dict[str, float | bool] = {}
    clips = [np.load(folder / f"out-{mode}" / "clipwise.npy") for mode in ("None", chunk)]
    found["clipwise_max_abs_diff"] = float(np.abs(clips[0] - clips[1]).max())
    if (folder / "out-None" / "framewise.npy").exists():
        whole, chunked = (np.load(folder / f"out-{mode}" / "framewise.npy") for mode in ("None", chunk))
        found.update(framewise_max_abs_diff=float(np.abs(whole - chunked).max()), frames=len(chunked))
    events = [folder / f"out-{mode}" / "predictions" / "predictions_events.tsv" for mode in ("None", chunk)]
    if events[0].exists():
        found["same_events"] = events[0].read_text() == events[1].read_text()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--chunk-seconds", type=float, nargs="+", default=[60.0], help="chunk lengths to run besides the whole file")
    parser.add_argument("--base-channels", type=int, default=64, help="64: the released width")
    parser.add_argument("--skip-whole", action="store_true", help="chunked runs only")
    parser.add_argument("--api", choices=["predict", "tag_file"], default="predict", help="trainer.predict or tag_file")
    parser.add_argument("--task", choices=["sed", "cnn14"], default="sed", help="predict with Cnn14_DecisionLevelMax (SED) or a Cnn14 clip classifier")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:  # one measurement, in this fresh process
        folder, chunk = args.child.split("|")
        seconds = None if chunk == "whole" else float(chunk)
        if args.api == "tag_file":
            print(json.dumps(run_tag_file(Path(folder), seconds, args.base_channels)))
        else:
            print(json.dumps(run_one(Path(folder), seconds, args.base_channels, args.task)))
        return
    import numpy as np
    import soundfile as sf

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for label in ("a", "b"):  # the data module wants a training split; predict reads the recording only
            (folder / "train" / label).mkdir(parents=True)
            sf.write(folder / "train" / label / f"{label}.wav", np.zeros(RATE, dtype=np.float32), RATE)
        (folder / "recording").mkdir()
        write_recording(folder / "recording" / "long.wav", args.minutes)
        modes = ([] if args.skip_whole else ["whole"]) + [str(c) for c in args.chunk_seconds]
        for mode in modes:
            result = subprocess.run([sys.executable, __file__, "--child", f"{folder}|{mode}", "--base-channels", str(args.base_channels),
                                     "--api", args.api, "--task", args.task],
                                    capture_output=True, text=True, check=False)
            if result.returncode != 0:
                print(json.dumps({"mode": mode, "error": result.returncode, "stderr": result.stderr[-2000:]}))
                continue
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            if mode != "whole" and not args.skip_whole:
                measured.update(compare(folder, str(float(mode))))
            print(json.dumps({"minutes": args.minutes, "base_channels": args.base_channels, **measured}), flush=True)


if __name__ == "__main__":
    main()
