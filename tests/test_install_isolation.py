"""One-package installs: each domain distribution declares only polyfm-core and its own
field libraries, importing it imports no other domain's field library, and every
distribution builds a wheel with complete metadata."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from importlib.metadata import requires
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIELD_LIBRARIES = {"medseg": {"monai", "nibabel"}, "geo": {"torchgeo", "rasterio"}, "audio": {"torchaudio"}, "mol": {"rdkit"}, "ts": set()}
DOMAINS = sorted(FIELD_LIBRARIES)


def _dependency_names(distribution: str) -> set[str]:
    names = set()
    for requirement in requires(distribution) or []:
        if "extra ==" in requirement:
            continue
        names.add(requirement.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0].strip().lower())
    return names


@pytest.mark.parametrize("domain", DOMAINS)
def test_declared_dependencies_stay_in_the_domain(domain):
    deps = _dependency_names(f"polyfm-{domain}")
    core = _dependency_names("polyfm-core")
    assert "polyfm-core" in deps
    others = set().union(*(libs for d, libs in FIELD_LIBRARIES.items() if d != domain))
    assert not (deps | core) & others, f"polyfm-{domain} pulls {(deps | core) & others}"
    assert not any(d.startswith("polyfm-") and d != "polyfm-core" for d in deps)


@pytest.mark.parametrize("domain", DOMAINS)
def test_import_loads_no_other_domains_field_library(domain):
    others = sorted(set().union(*(libs for d, libs in FIELD_LIBRARIES.items() if d != domain)) | {f"polyfm.{d}" for d in DOMAINS if d != domain})
    code = f"import json, sys, polyfm.{domain}; print(json.dumps([m for m in {others!r} if m in sys.modules]))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_no_namespace_init_files():
    assert not list(ROOT.glob("packages/*/src/polyfm/__init__.py"))


@pytest.mark.parametrize("package", ["core", *DOMAINS])
def test_wheel_has_complete_metadata(package, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT / "packages" / package)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    wheel = next(tmp_path.glob(f"polyfm_{package}-0.1.0-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
        assert f"Name: polyfm-{package}" in metadata and "Version: 0.1.0" in metadata
        assert "License-Expression: Apache-2.0" in metadata or "License: Apache-2.0" in metadata
        assert "Description-Content-Type: text/markdown" in metadata
        assert not any(n == "polyfm/__init__.py" for n in names)
        assert any(n.startswith(f"polyfm/{package}/") for n in names)
        if package != "core":
            assert "Requires-Dist: polyfm-core<0.2,>=0.1.0" in metadata
            entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
            for group in ("polyfm.models", "polyfm.weights", "polyfm.kits", "polyfm.bench"):
                assert f"[{group}]" in entry_points
        else:
            assert "polyfm = polyfm.core.cli:main" in archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
