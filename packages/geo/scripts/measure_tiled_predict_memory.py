"""Peak memory of tiled segmentation prediction of one large GeoTIFF (not a test).

Writes a synthetic uint16 scene window by window (so writing it costs no scene-sized array),
then predicts it in a child process per size with a tiny per-pixel model (1x1 conv) through
``GeoTiffSegmentationDataModule(predict_chip_size=...)`` + ``GeoPredictionWriter``, and
prints the child's peak RSS (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``) and time.
``--gdal-cache-mb`` caps GDAL's block cache for the reads and the writes (the datamodule's
``predict_gdal_cache_mb`` and the writer's ``gdal_cache_mb``); ``--gdal-cache-mb none`` leaves
GDAL's default (5 % of RAM). ``--reads-only`` only cuts the chips (``GeoTiffChips``, no model, no
writer) and prints how much the peak grew after the first strip read.

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


def write_scene(path: Path, size: int, bands: int, height: int | None = None) -> None:
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    rng = np.random.default_rng(0)
    height = size if height is None else height
    with rasterio.open(path, "w", driver="GTiff", height=height, width=size, count=bands, dtype="uint16", crs="EPSG:32633",
                       transform=from_origin(500_000, 4_200_000, 10, 10), nodata=0, tiled=True, blockxsize=256, blockysize=256,
                       compress="deflate", BIGTIFF="IF_SAFER") as out:
        for top in range(0, height, 256):
            rows = min(256, height - top)
            out.write(rng.integers(1, 10_000, size=(bands, rows, size), dtype=np.uint16), window=Window(0, top, size, rows))


def predict(folder: Path, scene: Path, bands: int, classes: int, chip: int, stride: int, probabilities: bool, cache_mb: int | None) -> None:
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
                                         predict_paths=[str(scene)], predict_chip_size=chip, predict_stride=stride, batch_size=16,
                                         predict_gdal_cache_mb=cache_mb)
    torch.manual_seed(0)
    task = GeoSegmentation(nn.Conv2d(bands, classes, 1), num_classes=classes)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(folder),
                        callbacks=[GeoPredictionWriter(str(folder / "out"), write_probabilities=probabilities, gdal_cache_mb=cache_mb)])
    trainer.predict(task, data)


def _cache_mb(value: str) -> int | None:
    return None if value.lower() == "none" else int(value)


def reads_only(scene: Path, bands: int, chip: int, stride: int, cache_mb: int | None) -> None:
    from polyfm.geo.data import GeoTiffChips

    names = ["red", "green", "blue"] if bands == 3 else [f"B{i}" for i in (1, 2, 3, 4, 5, 6, 7, 8, "8A", 9, 10, 11, 12)][:bands]
    chips = GeoTiffChips([scene], names, chip, stride, scale=1e-4, nodata="fill", gdal_cache_mb=cache_mb)
    chips[0]  # imports, GDAL and the first strip (rows 0..chip: one row of 256 px tiles)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for index in range(1, len(chips)):
        chips[index]
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps({"reads_only": True, "chips": len(chips), "gdal_cache_mb": cache_mb, "peak_grew_after_first_strip_mb": round(grew, 1)}))


def main() -> None:
    from polyfm.geo.data import DEFAULT_GDAL_CACHE_MB

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 8192], help="scene widths (and heights unless --height)")
    parser.add_argument("--height", type=int, default=None, help="scene height (default: the width; memory grows with the width)")
    parser.add_argument("--bands", type=int, default=3)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--chip", type=int, default=224)
    parser.add_argument("--stride", type=int, default=168)
    parser.add_argument("--probabilities", action="store_true", help="also write <stem>_probabilities.tif")
    parser.add_argument("--gdal-cache-mb", type=_cache_mb, default=DEFAULT_GDAL_CACHE_MB,
                        help=f"GDAL block cache cap in MB, or 'none' for GDAL's default (default {DEFAULT_GDAL_CACHE_MB})")
    parser.add_argument("--reads-only", action="store_true", help="only read the chips (no model, no writer)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child and args.reads_only:
        reads_only(Path(args.child[1]), args.bands, args.chip, args.stride, args.gdal_cache_mb)
        return
    if args.child:
        predict(Path(args.child[0]), Path(args.child[1]), args.bands, args.classes, args.chip, args.stride, args.probabilities, args.gdal_cache_mb)
        return
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            scene = folder / f"scene_{size}.tif"
            write_scene(scene, size, args.bands, args.height)
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            start = time.perf_counter()
            command = [sys.executable, __file__, "--bands", str(args.bands), "--classes", str(args.classes), "--chip", str(args.chip),
                       "--stride", str(args.stride), *(["--probabilities"] if args.probabilities else []),
                       "--gdal-cache-mb", str(args.gdal_cache_mb), *(["--reads-only"] if args.reads_only else []),
                       "--child", str(folder), str(scene)]
            subprocess.run(command, check=True)
            if args.reads_only:
                continue
            seconds = time.perf_counter() - start
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux; the max over children so far
            outputs = {p.name: p.stat().st_size for p in (folder / "out").iterdir()}
            print(json.dumps({"size": size, "height": args.height or size, "bands": args.bands, "classes": args.classes, "chip": args.chip, "stride": args.stride,
                              "gdal_cache_mb": args.gdal_cache_mb,
                              "peak_rss_mb": round(peak / 1024, 1), "grew": peak > before, "seconds": round(seconds, 1), "outputs": outputs}),
                  flush=True)


if __name__ == "__main__":
    main()
