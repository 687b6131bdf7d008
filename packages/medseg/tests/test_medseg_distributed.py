"""Test and validation metrics gathered across DDP ranks: the same numbers as one process, each case once."""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import time
from pathlib import Path

import pytest
import torch

from polyfm.medseg.tasks import gather_cases


def test_medseg_gather_cases_counts_padded_repeats_once() -> None:
    """3 cases on 2 ranks: DistributedSampler gives rank 0 [0, 2] and rank 1 [1, 0] (0 repeated as padding)."""
    rows = {0: [0.5, 1.0], 1: [0.25, float("nan")], 2: [0.75, 0.0]}
    ranks = [[0, 2], [1, 0]]
    per_rank = [
        {"keys": keys, "names": [f"case{k}" for k in keys], "columns": {"hd95": torch.tensor([rows[k] for k in keys])}}
        for keys in ranks
    ]
    columns, names, repeats = gather_cases(per_rank)
    assert names == ["case0", "case1", "case2"] and repeats == 1  # dataset order, as one process sees them
    torch.testing.assert_close(columns["hd95"], torch.tensor([rows[0], rows[1], rows[2]]), equal_nan=True)
    # keys that are not dataset indices (case name, occurrence): rank order, repeats still once
    by_name = [{**p, "keys": [(n, 0) for n in p["names"]]} for p in per_rank]
    _, names, repeats = gather_cases(by_name)
    assert names == ["case0", "case2", "case1"] and repeats == 1
    with pytest.raises(ValueError, match="'hd95' has 3 rows over the ranks for 4 cases"):
        gather_cases([per_rank[0], {**per_rank[1], "columns": {"hd95": torch.tensor([rows[1]])}}])


def _dataset(tmp_path: Path) -> Path:
    """5 labelled phantoms to fit/validate on (3 validation cases) and 3 test cases: odd counts, so 2 ranks get
    a padded repeat in both."""
    from polyfm.medseg.samples import write_synthetic_dataset

    dataset_json = write_synthetic_dataset(tmp_path / "phantoms", n_labelled=6, n_unlabelled=0, shape=(32, 32, 16))
    description = json.loads(dataset_json.read_text())
    description["test"] = description["training"][5:] + description["test"]
    description["training"] = description["training"][:5]
    dataset_json.write_text(json.dumps(description))
    return dataset_json


def _per_case(folder: Path) -> list[dict[str, str]]:
    (table,) = folder.glob("**/test_per_case.csv")
    return list(csv.DictReader(table.open()))


def _same(a: dict[str, float], b: dict[str, float]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert (math.isnan(a[key]) and math.isnan(b[key])) or a[key] == pytest.approx(b[key], abs=1e-6), key


def _data_and_task(dataset_json: Path) -> tuple:
    from polyfm.medseg.data import SegmentationDataModule
    from polyfm.medseg.models import UNet
    from polyfm.medseg.tasks import VolumeSegmentation

    data = SegmentationDataModule(str(dataset_json), roi_size=[32, 32, 16], num_samples=1, batch_size=2, val_fraction=0.6, augment=False)
    torch.manual_seed(0)
    return data, VolumeSegmentation(UNet(channels=[4, 8, 16], strides=[2, 2]), num_classes=3, roi_size=[32, 32, 16])


def _validate_and_test(folder: Path, devices: int, strategy: str) -> dict:
    import lightning as L

    data, task = _data_and_task(folder / "phantoms" / "dataset.json")
    run = folder / f"devices{devices}"
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=L.pytorch.loggers.CSVLogger(run),
                        default_root_dir=run, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    (validation,) = trainer.validate(task, datamodule=data, ckpt_path=str(folder / "fitted.ckpt"), verbose=False)
    (test,) = trainer.test(task, datamodule=data, ckpt_path=str(folder / "fitted.ckpt"), verbose=False)
    return {"validation": validation, "test": test, "rows": _per_case(run) if trainer.is_global_zero else None}


def _ddp_rank(rank: int, world: int, port: int, folder: str) -> None:
    """One rank, as torchrun starts it (Lightning sees LOCAL_RANK and creates no processes): validate and
    test run in the same two processes, so the test pays for one start-up of torch, not two."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0", OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    results = _validate_and_test(Path(folder), world, "ddp")
    if rank == 0:
        (Path(folder) / "ddp.json").write_text(json.dumps(results))


def test_medseg_ddp_test_and_validation_metrics_equal_one_process(tmp_path) -> None:
    """2 processes (gloo, CPU) vs 1 on the same checkpoint and data: the logged validation Dice and test
    Dice / HD95 / surface Dice are equal, and test_per_case.csv lists each of the 3 test cases once."""
    import lightning as L

    dataset_json = _dataset(tmp_path)
    data, task = _data_and_task(dataset_json)
    trainer = L.Trainer(max_steps=10, accelerator="cpu", logger=False, limit_val_batches=0, num_sanity_val_steps=0,
                        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(task, datamodule=data)  # a few steps, so the label maps differ from case to case
    trainer.save_checkpoint(tmp_path / "fitted.ckpt")
    one = _validate_and_test(tmp_path, 1, "auto")

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workers = torch.multiprocessing.start_processes(_ddp_rank, args=(2, port, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 300
    while not workers.join(timeout=2):
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.terminate()
            pytest.fail("the 2 DDP ranks did not finish in 300 s: a collective waiting on one rank?")
    ddp = json.loads((tmp_path / "ddp.json").read_text())

    assert {"test/dice", "test/dice/liver", "test/hd95", "test/hd95/spleen", "test/surface_dice"} <= set(one["test"])
    assert 0.0 < one["test"]["test/dice"] < 1.0 and math.isfinite(one["test"]["test/hd95"])
    assert {"val/dice", "val/dice/liver", "val/dice/spleen"} <= set(one["validation"])
    _same(ddp["validation"], one["validation"])
    _same(ddp["test"], one["test"])
    # each test case once, in the dataset's order, with the single process's values
    assert [Path(r["case"]).name for r in ddp["rows"]] == ["phantom_005.nii.gz", "phantom_006.nii.gz", "phantom_007.nii.gz"]
    assert ddp["rows"] == one["rows"]
    # the padded repeat (case 0 again on rank 1) would have moved the mean: the dedup is what makes them equal
    rows = one["rows"]
    counted_twice = [float(r["dice/liver"]) for r in rows] + [float(rows[0]["dice/liver"])]
    assert sum(counted_twice) / 4 != pytest.approx(one["test"]["test/dice/liver"], abs=1e-4)
