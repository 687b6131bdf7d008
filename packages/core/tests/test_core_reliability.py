"""Bad input to the engine's own readers (checkpoints, study YAML, archives): a clear
error naming the file, never a bare traceback from deep inside a library."""

from __future__ import annotations

import io
import tarfile
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polyfm.core.errors import CheckpointError, ConfigError, DataError
from polyfm.core.safety import safe_extract
from polyfm.core.studies import StudyConfig
from polyfm.core.toy import ToyEncoder
from polyfm.core.weights import load_checkpoint_file

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.binary(min_size=0, max_size=4096), suffix=st.sampled_from([".pth", ".pt", ".ckpt", ".safetensors"]))
def test_random_bytes_as_a_checkpoint_give_a_checkpoint_error(tmp_path, data, suffix):
    path = tmp_path / f"fuzzed{suffix}"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(path)
    assert str(path) in str(info.value)


@FUZZ
@given(cut=st.floats(0.05, 0.95))
def test_truncated_checkpoints_are_reported(tmp_path, cut):
    buffer = io.BytesIO()
    torch.save({"model": ToyEncoder().state_dict()}, buffer)
    data = buffer.getvalue()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_checkpoint_file(path)


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=8))
yaml_values = st.recursive(yaml_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


@FUZZ
@given(
    document=st.dictionaries(
        st.sampled_from(["name", "output", "targets", "sources", "adaptations", "label_fractions", "seeds", "quick", "data_dir", "epochs"]),
        yaml_values,
        max_size=6,
    )
)
def test_fuzzed_study_files_load_or_fail_with_a_config_error(tmp_path, document):
    import yaml

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        config = StudyConfig.load(path)
    except ConfigError as exc:
        assert str(path) in str(exc)
    else:
        assert config.runs() is not None


def test_archive_with_path_traversal_is_refused_and_nothing_is_written(tmp_path):
    archive = tmp_path / "weights.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("ok.txt", "../escaped.txt"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(DataError, match=r"weights.tar.gz.*\.\./escaped.txt.*path traversal"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out" / "ok.txt").exists()

    zipped = tmp_path / "abs.zip"
    with zipfile.ZipFile(zipped, "w") as archive_zip:
        archive_zip.writestr("/etc/evil", "x")
        archive_zip.writestr("fine/file.txt", "x")
    with pytest.raises(DataError, match="'/etc/evil'"):  # absolute members are refused too
        safe_extract(zipped, tmp_path / "out1")
    with zipfile.ZipFile(tmp_path / "dots.zip", "w") as archive_zip:
        archive_zip.writestr("a/../../evil", "x")
    with pytest.raises(DataError, match="path traversal"):
        safe_extract(tmp_path / "dots.zip", tmp_path / "out2")

    linked = tmp_path / "link.tar"
    with tarfile.open(linked, "w") as tar:
        info = tarfile.TarInfo("passwd")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(DataError, match="links and devices"):
        safe_extract(linked, tmp_path / "out3")
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as archive_zip:
        archive_zip.writestr("fine/file.txt", "x")
    assert [p.read_text() for p in safe_extract(good, tmp_path / "out4")] == ["x"]


def test_corrupt_archive_names_the_file(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="bad.tar.gz"):
        safe_extract(bad, tmp_path / "out")
