"""The quick ``polyfm bench`` cases of ts build and step, ours and granite-tsfm's: the same
forecast shapes, finite training losses, the same number of windows from the same CSV."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from polyfm.ts.bench import ETT_CHANNELS, ETT_ROWS, cases, ett_like_csv

CASES = cases(quick=True)


def test_ett_like_csv_has_the_ett_shape(tmp_path) -> None:
    frame = pd.read_csv(ett_like_csv(tmp_path))
    assert list(frame.columns) == ["date", *ETT_CHANNELS] and len(frame) == ETT_ROWS
    assert pd.to_datetime(frame["date"]).diff().dropna().eq(pd.Timedelta(hours=1)).all()


def test_full_mode_adds_the_second_config() -> None:
    quick, full = {c.name for c in CASES}, {c.name for c in cases(quick=False)}
    assert quick < full and any("1024-96" in name for name in full - quick)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_quick_case_steps_ours_and_reference(case) -> None:
    pytest.importorskip("tsfm_public", reason="granite-tsfm (test-only) not installed")
    device = torch.device("cpu")
    ours, reference = case.ours(device)(), case.reference(device)()
    if case.name.endswith("/train"):
        assert torch.isfinite(ours) and torch.isfinite(reference)
    elif case.name.startswith("ts/windows"):
        assert ours == reference == case.items
    else:
        assert ours.shape == reference.shape == (case.items, 96, 7)
