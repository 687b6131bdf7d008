"""Property-based tests of every domain reader (hypothesis): fuzzed CSVs, audio files,
rasters and dataset descriptions either read completely (no row silently dropped) or fail
with a polyfm error that names the file — never a bare traceback from inside a library,
never a hang."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polyfm.core.errors import PolyfmError

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
cells = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(lambda v: repr(float(v))),
    st.integers(-1000, 1000).map(str),
    st.sampled_from(["", "nan", "NA", "abc", "1e400", "-", "1,5", '"x"']),
)


def _name_in(error: BaseException, path) -> bool:
    return str(path) in str(error) or path.name in str(error)


@FUZZ
@given(
    rows=st.lists(st.tuples(st.integers(0, 400), cells, cells), min_size=0, max_size=40),
    hourly=st.booleans(),
)
def test_ts_series_reader(tmp_path, rows, hourly):
    from polyfm.ts.data import read_series

    start = np.datetime64("2016-07-01T00:00")
    step = np.timedelta64(1, "h") if hourly else np.timedelta64(15, "m")
    lines = ["date,HUFL,OT"] + [f"{start + int(offset) * step},{a},{b}" for offset, a, b in rows]
    path = tmp_path / "series.csv"
    path.write_text("\n".join(lines) + "\n")
    try:
        series = read_series(path)
    except PolyfmError as exc:
        assert _name_in(exc, path), str(exc)
    else:
        assert len(series) >= len(rows)  # defaults never drop rows (gaps would only add NaN steps)


@FUZZ
@given(data=st.binary(max_size=2048))
def test_audio_reader_on_random_bytes(tmp_path, data):
    from polyfm.audio.data import load_audio

    path = tmp_path / "clip.wav"
    path.write_bytes(data)
    with pytest.raises(PolyfmError) as info:
        load_audio(path, sample_rate=16000, clip_samples=16000)
    assert _name_in(info.value, path)


@FUZZ
@given(
    rate=st.sampled_from([8000, 11025, 16000, 22050, 44100, 48000]),
    channels=st.integers(1, 3),
    frames=st.integers(0, 4000),
    subtype=st.sampled_from(["PCM_16", "PCM_24", "FLOAT"]),
    poison=st.sampled_from([None, "nan", "silence"]),
)
def test_audio_reader_on_real_but_odd_files(tmp_path, rate, channels, frames, subtype, poison):
    import soundfile as sf

    from polyfm.audio.data import load_audio

    signal = np.random.default_rng(0).uniform(-0.5, 0.5, (frames, channels)).astype(np.float32)
    if poison == "nan" and frames and subtype == "FLOAT":
        signal[frames // 2, 0] = np.nan
    if poison == "silence":
        signal[:] = 0
    path = tmp_path / f"clip-{rate}-{channels}.wav"
    sf.write(path, signal, rate, subtype=subtype)
    try:
        wave = load_audio(path, sample_rate=32000, clip_samples=32000)
    except PolyfmError as exc:
        assert _name_in(exc, path), str(exc)
    else:
        assert wave.shape == (32000,) and bool(wave.isfinite().all())


smiles_cells = st.one_of(
    st.sampled_from(["CCO", "c1ccccc1", "C1CC1", "[Na+].[Cl-]", "CC(=O)O", "C(", "XYZ", "", "c1ccc", "N#N", "CC.CCO", "[2H]C"]),
    st.text(alphabet="CNOcn()=#[]+-123456789@/\\.", max_size=12),
)


@FUZZ
@given(rows=st.lists(st.tuples(smiles_cells, cells), min_size=0, max_size=25))
def test_mol_csv_reader(tmp_path, rows):
    from polyfm.mol.data import read_molecule_csv

    path = tmp_path / "molecules.csv"
    path.write_text("smiles,y\n" + "".join(f'"{s}",{v}\n' for s, v in rows))
    try:
        table = read_molecule_csv(path, target_columns=["y"])
    except PolyfmError as exc:
        assert _name_in(exc, path), str(exc)
    else:
        assert len(table.smiles) == len(rows) and not table.skipped  # nothing dropped unless asked


@FUZZ
@given(data=st.binary(max_size=4096))
def test_geo_raster_reader_on_random_bytes(tmp_path, data):
    from polyfm.geo.data import read_raster

    path = tmp_path / "tile.tif"
    path.write_bytes(data)
    with pytest.raises(PolyfmError) as info:
        read_raster(path, expected_bands=13)
    assert _name_in(info.value, path)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["image", "label", "training", "labels", "x"]), inner, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(document=st.one_of(json_values, st.text(max_size=40)))
def test_medseg_decathlon_reader(tmp_path, document):
    from polyfm.medseg.data import read_decathlon

    path = tmp_path / "dataset.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    try:
        cases, names = read_decathlon(path)
    except PolyfmError as exc:
        assert _name_in(exc, path), str(exc)
    else:
        assert isinstance(cases, list) and all(math.isfinite(len(c)) for c in cases)
