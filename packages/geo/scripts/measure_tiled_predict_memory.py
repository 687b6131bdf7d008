"""Peak memory of tiled segmentation prediction of one large GeoTIFF (not a test).

Writes a synthetic uint16 scene window by window (so writing it costs no scene-sized array),
then predicts it in a child process per size with a tiny per-pixel model (1x1 conv) through
``GeoTiffSegmentationDataModule(predict_chip_size=...)`` + ``GeoPredictionWriter``, and
prints the child's peak RSS (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``) and time.

    OMP_NUM_THREADS=1 .venv/bin/python packages/geo/scripts/measure_tiled_predict_memory.py \
        --sizes 512 8192 --bands 3 --classes 4 --chip 224 --stride 168 --probabilities
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


def write_scene(path: Path, size: int, bands: int) -> None:
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", driver="GTiff", height=size, width=size, count=bands, dtype="uint16", crs="EPSG:32633",
                       transform=from_origin(500_000, 4_200_000, 10, 10), nodata=0, tiled=True, blockxsize=256, blockysize=256,
                       compress="deflate", BIGTIFF="IF_SAFER") as out:
        for top in range(0, size, 256):
            rows = min(256, size - top)
            out.write(rng.integers(1, 10_000, size=(bands, rows, size), dtype=np.uint16), window=Window(0, top, size, rows))


def predict(folder: Path, scene: Path, bands: int, classes: int, chip: int, stride: int, probabilities: bool) -> None:
    import lightning as L
    import numpy as np
    import rasterio
    import torch
    from torch import nn

    from polyfm.geo.data import GeoTiffSegmentationDataModule
    from polyfm.geo.predict import GeoPredictionWriter
    from polyfm.geo.tasks import GeoSegmentation

    torch.set_num_threads(1)
    names = ["red", "green", "blue"] if bands == 3 else [f"B{i}" for i in (1, 2, 3, 4, 5, 6, 7, 8, "8A", 9, 10, 11, 12)][:bands]
    with rasterio.open(folder / "image.tif", "w", driver="GTiff", height=8, width=8, count=bands, dtype="uint16") as out:
        out.write(np.ones((bands, 8, 8), np.uint16))
    with rasterio.open(folder / "mask.tif", "w", driver="GTiff", height=8, width=8, count=1, dtype="uint8") as out:
        out.write(np.zeros((1, 8, 8), np.uint8))
    (folder / "pairs.csv").write_text("image,mask\nimage.tif,mask.tif\n")
    data = GeoTiffSegmentationDataModule(str(folder / "pairs.csv"), bands=names, num_classes=classes, scale=1e-4, nodata="fill",
                                         predict_paths=[str(scene)], predict_chip_size=chip, predict_stride=stride, batch_size=16)
    torch.manual_seed(0)
    task = GeoSegmentation(nn.Conv2d(bands, classes, 1), num_classes=classes)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(folder), callbacks=[GeoPredictionWriter(str(folder / "out"), write_probabilities=probabilities)])
    trainer.predict(task, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 8192])
    parser.add_argument("--bands", type=int, default=3)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--chip", type=int, default=224)
    parser.add_argument("--stride", type=int, default=168)
    parser.add_argument("--probabilities", action="store_true", help="also write <stem>_probabilities.tif")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        predict(Path(args.child[0]), Path(args.child[1]), args.bands, args.classes, args.chip, args.stride, args.probabilities)
        return
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            scene = folder / f"scene_{size}.tif"
            write_scene(scene, size, args.bands)
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            start = time.perf_counter()
            command = [sys.executable, __file__, "--bands", str(args.bands), "--classes", str(args.classes), "--chip", str(args.chip),
                       "--stride", str(args.stride), *(["--probabilities"] if args.probabilities else []), "--child", str(folder), str(scene)]
            subprocess.run(command, check=True)
            seconds = time.perf_counter() - start
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux; the max over children so far
            outputs = {p.name: p.stat().st_size for p in (folder / "out").iterdir()}
            print(json.dumps({"size": size, "bands": args.bands, "classes": args.classes, "chip": args.chip, "stride": args.stride,
                              "peak_rss_mb": round(peak / 1024, 1), "grew": peak > before, "seconds": round(seconds, 1), "outputs": outputs}),
                  flush=True)


if __name__ == "__main__":
    main()
