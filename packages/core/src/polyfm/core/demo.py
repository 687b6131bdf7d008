"""``polyfm demo``: the main job on every installed domain package.

For each domain: pretrain briefly with the domain's own objective, fine-tune from
the pretrained encoder and from scratch at two label fractions, and write the report
(table, summary, plots). Built-in samples when no data folder is given; the real
datasets under ``$POLYFM_DATA_DIR`` when it is set.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from polyfm.core.kit import installed_kits
from polyfm.core.studies import StudyConfig, run_study, study_failures


def run_demo(
    output: Path = Path("reports/demo"),
    data_dir: str | None = None,
    domains: list[str] | None = None,
    quick: bool = False,
    label_fractions: tuple[float, float] = (0.25, 1.0),
    seeds: tuple[int, ...] = (0, 1, 2),
) -> Path:
    data_dir = data_dir or os.environ.get("POLYFM_DATA_DIR") or None
    available = sorted(installed_kits(include_registered=domains is not None))
    chosen = [d for d in available if domains is None or d in domains]
    missing = sorted(set(domains or []) - set(available))
    if missing:
        raise SystemExit(f"polyfm demo: no installed domain package for {missing}; installed: {available}")
    if not chosen:
        raise SystemExit("polyfm demo: no domain package is installed; pip install polyfm-audio (or ts, mol, geo, medseg).")
    print(f"polyfm demo: domains {chosen}; data: {data_dir or 'built-in samples'}; report in {output}", flush=True)
    print("On a 2-core CPU this takes under 10 minutes; progress and time left are printed after every run.", flush=True)
    start = time.time()
    config = StudyConfig(
        name="demo",
        output=str(output),
        targets=[{"domain": d} for d in chosen],
        sources=["scratch", "pretrained"],
        adaptations=[{"mode": "full"}],
        label_fractions=list(label_fractions),
        seeds=list(seeds),
        quick=True,  # demo-sized models: the point is the whole pipeline on real runs, in minutes
        data_dir=data_dir,
    )
    out = run_study(config)
    failures = study_failures(out)
    if failures:
        raise SystemExit(f"polyfm demo: {len(failures)} run(s) failed; the report holds the others. Tracebacks: {out / 'failed'}")
    print(f"polyfm demo: done in {(time.time() - start) / 60:.1f} min. Report: {out / 'summary.md'}, table: {out / 'results.csv'}, plots: {out}/*.png", flush=True)
    return out
