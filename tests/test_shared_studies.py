"""The study files in shared/ stay valid as the code changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from polyfm.core.studies import StudyConfig

STUDIES = sorted((Path(__file__).resolve().parents[1] / "shared" / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_shared_study_files_load(path):
    config = StudyConfig.load(path)
    runs = config.runs()
    assert runs and len({(r["domain"], r["source"], str(r["adaptation"]), r["label_fraction"], r["seed"]) for r in runs}) == len(runs)
