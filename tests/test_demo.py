"""The README's first command end to end: `polyfm demo` on the built-in samples of every
installed domain package writes the table, the summary and the plots from real runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd

from polyfm.core.kit import installed_kits


def test_demo_writes_a_report_from_real_runs(tmp_path):
    domains = installed_kits(include_registered=False)
    assert domains, "no domain kit installed"
    env = {k: v for k, v in os.environ.items() if k != "POLYFM_DATA_DIR"}  # built-in samples
    result = subprocess.run(
        [sys.executable, "-m", "polyfm.core.cli", "demo", "--output", str(tmp_path / "demo"), "--seeds", "0"],
        capture_output=True, text=True, timeout=1200, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert "runs done" in result.stdout and "left" in result.stdout  # progress as it goes
    out = tmp_path / "demo"
    table = pd.read_csv(out / "results.csv")
    assert sorted(table["domain"].unique()) == domains
    assert len(table) == 4 * len(domains)  # scratch/pretrained x two label fractions
    assert set(table["label_fraction"]) == {0.25, 1.0} and set(table["source"]) == {"scratch", "pretrained"}
    assert table["metric"].notna().all() and (table["seconds"] > 0).all()
    assert (table.groupby("domain")["n_train"].nunique() == 2).all()  # the fractions really subsample
    assert pd.read_parquet(out / "results.parquet").shape == table.shape
    summary = (out / "summary.md").read_text()
    for domain in domains:
        assert f"## {domain}:" in summary
        assert (out / f"label_efficiency_{domain}.png").stat().st_size > 5_000
    assert (out / "transfer_heatmap.png").exists()
    for info in (out / "pretrained").glob("*.json"):
        assert json.loads(info.read_text())["seconds"] > 0
