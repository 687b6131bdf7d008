"""The Python blocks of docs/ts.md run as written (offline: official-layout checkpoints put in the cache first)."""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

import pytest

from polyfm.ts.bench import CONFIGS
from polyfm.ts.models.ttm import TTM

DOC = Path(__file__).resolve().parents[3] / "docs" / "ts.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S) if DOC.exists() else []

warnings.filterwarnings("ignore", ".*does not have many workers.*")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def _block(marker: str) -> str:
    found = [b for b in BLOCKS if marker in b]
    if not DOC.exists():
        pytest.skip("docs/ts.md is not beside this checkout")
    assert len(found) == 1, f"docs/ts.md: expected one python block with {marker!r}"
    return found[0]


def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **architecture: int) -> None:
    """What `polyfm weights fetch ttm-r2-512-96` leaves: config.json + model.safetensors in $POLYFM_CACHE/weights/<name>/."""
    monkeypatch.setenv("POLYFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("POLYFM_OFFLINE", "1")
    TTM(**architecture).save_pretrained(tmp_path / "cache" / "weights" / "ttm-r2-512-96")
    monkeypatch.chdir(tmp_path)


def test_ts_doc_weights_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _cache(tmp_path, monkeypatch, **CONFIGS["r2-512-96"])
    namespace: dict = {}
    exec(compile(_block('model.save_pretrained("my-ttm")'), str(DOC), "exec"), namespace)
    assert (tmp_path / "my-ttm" / "model.safetensors").exists()
    assert namespace["model"].config.d_model == 192


def test_ts_doc_csv_to_plot_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the real ETTh1; a tiny TTM stands in for the r2 weights, and one epoch for ten (the only change)."""
    root = os.environ.get("POLYFM_DATA_DIR")
    if not root or not (Path(root) / "ts" / "ETTh1.csv").exists():
        pytest.skip("POLYFM_DATA_DIR with ts/ETTh1.csv is not set")
    _cache(tmp_path, monkeypatch, context_length=512, prediction_length=96, patch_length=64, d_model=16, decoder_d_model=8,
           num_layers=1, decoder_num_layers=1, adaptive_patching_levels=1)
    (tmp_path / "ETTh1.csv").symlink_to(Path(root) / "ts" / "ETTh1.csv")
    code = _block("from polyfm.ts.data import ForecastDataModule")
    assert "epochs=10" in code
    namespace: dict = {}
    exec(compile(code.replace("epochs=10", "epochs=1"), str(DOC), "exec"), namespace)
    future = namespace["future"]
    assert list(future.columns) == ["date", "HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"] and len(future) == 96
    assert str(future["date"].iloc[0]) == str(namespace["truth"]["date"].iloc[0])
    assert (tmp_path / "etth1-forecast.png").stat().st_size > 10_000
