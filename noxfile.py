"""Developer sessions. All share one virtualenv (.venv): installing torch again for
each session would waste minutes and gigabytes.

    nox -s tests                # every package's tests and the cross-package ones
    nox -s tests -- ts          # one package
    nox -s demo                 # the main job: pretrain, fine-tune, compare, report
    nox -s lint typecheck docs bench
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
VENV = ROOT / ".venv"
PACKAGES = ["core", "ts", "audio", "mol", "geo", "medseg"]
nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "none"


def _bin(name: str) -> str:
    return str(VENV / "bin" / name)


def ensure_env(session: nox.Session) -> None:
    """Create .venv once and install the pinned set, the six packages (editable) and test-only references."""
    if not (VENV / "bin" / "python").exists():
        session.run(sys.executable, "-m", "venv", str(VENV))
    pip = [_bin("python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    constraints = ["-c", str(ROOT / "requirements" / "constraints.txt")]
    marker = VENV / ".polyfm-installed"
    stamp = "".join(
        (ROOT / p).read_text()
        for p in ["requirements/constraints.txt", "requirements/dev.txt", *(f"packages/{d}/pyproject.toml" for d in PACKAGES)]
        + [f"packages/{d}/requirements-test{s}.txt" for d in PACKAGES[1:] for s in ("", "-nodeps")]
        if (ROOT / p).exists()
    )
    if marker.exists() and marker.read_text() == stamp:
        return
    # torch first, alone: its resolution decides the rest
    session.run(*pip, *constraints, "torch", "torchvision", "torchaudio", external=True)
    session.run(*pip, *constraints, "-r", str(ROOT / "requirements" / "dev.txt"), *[x for d in PACKAGES for x in ("-e", str(ROOT / "packages" / d))], external=True)
    for d in PACKAGES[1:]:
        for suffix, extra in (("", []), ("-nodeps", ["--no-deps"])):
            req = ROOT / "packages" / d / f"requirements-test{suffix}.txt"
            if req.exists() and any(line.strip() and not line.startswith("#") for line in req.read_text().splitlines()):
                session.run(*pip, *extra, "-r", str(req), external=True)
    marker.write_text(stamp)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the tests: all packages, or those named after `--`."""
    ensure_env(session)
    options = [a for a in session.posargs if a.startswith("-")]  # pytest options, e.g. -x, -k expr, --durations=20
    chosen = [a for a in session.posargs if not a.startswith("-")] or [*PACKAGES, "tests"]
    paths = [str(ROOT / "tests") if name == "tests" else str(ROOT / "packages" / name / "tests") for name in chosen]
    env = {"POLYFM_DATA_DIR": os.environ.get("POLYFM_DATA_DIR", ""), "POLYFM_OFFLINE": "1"}
    session.run(_bin("python"), "-m", "pytest", *paths, "-q", "--durations=25", *options, env=env, external=True)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: for every domain, pretrain briefly, fine-tune at two label fractions, compare with scratch, write the report."""
    ensure_env(session)
    session.run(_bin("polyfm"), "demo", "--output", "reports/demo", *session.posargs, env={"POLYFM_OFFLINE": "1"}, external=True)


@nox.session
def lint(session: nox.Session) -> None:
    ensure_env(session)
    session.run(_bin("ruff"), "check", "packages", "tests", "noxfile.py", external=True)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy on all six packages: strict on polyfm.core, the defaults on the domain packages."""
    ensure_env(session)
    session.run(_bin("mypy"), *[x for d in PACKAGES for x in ("-p", f"polyfm.{d}")], external=True)


@nox.session
def bench(session: nox.Session) -> None:
    """Throughput and peak memory, ours vs the reference implementations, into reports/bench.json."""
    ensure_env(session)
    session.run(_bin("polyfm"), "bench", "--output", "reports/bench.json", *session.posargs, external=True)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the docs site into site/."""
    ensure_env(session)
    session.run(_bin("python"), "-m", "pip", "install", "-q", "mkdocs==1.6.1", external=True)
    session.run(_bin("mkdocs"), "build", "--strict", "--site-dir", "site", external=True)


# What the GPU machine (Python 3.12, x86-64, no network) lacks, by group; it has torch, lightning,
# torchmetrics, peft, transformers, timm, torchaudio and the scientific stack already. One device run
# carries at most 64 MiB, so the groups are sized to be taken two runs at a time: "audio ts medseg mol"
# and "geo" (rasterio and pyproj bundle GDAL and PROJ: ~50 MB alone). "base" goes with every run.
DEVICE_WHEELS = {
    "base": ["jsonargparse", "docstring_parser", "typeshed_client", "importlib_resources"],
    "audio": ["soundfile", "cffi", "pycparser", "panns-inference", "torchlibrosa", "librosa", "soxr", "audioread", "pooch", "platformdirs", "decorator"],
    "ts": ["granite-tsfm", "datasets", "dill", "multiprocess", "deprecated"],
    "medseg": ["monai", "nibabel", "pydicom"],
    "mol": ["rdkit", "unimol-tools", "addict", "omegaconf", "hydra-core", "antlr4-python3-runtime", "lmdb"],
    "geo": ["torchgeo", "rasterio", "affine", "cligj", "click-plugins", "pyproj", "shapely", "geopandas", "rshf", "dinov2"],
}
DEVICE_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
DEVICE_CARRY_LIMIT = 60 * 2**20  # the run's 64 MiB also holds the working tree (~2 MB)


@nox.session(name="device-wheels")
def device_wheels(session: nox.Session) -> None:
    """Fill .whl/ with what a GPU device run needs: `nox -s device-wheels -- audio ts medseg mol` (see docs/benchmarks.md#gpu)."""
    import shutil

    groups = session.posargs or ["audio", "ts", "medseg", "mol"]
    unknown = sorted(set(groups) - set(DEVICE_WHEELS))
    if unknown:
        session.error(f"unknown group(s) {unknown}; choose from {sorted(DEVICE_WHEELS)}")
    out = ROOT / ".whl"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    pip = [sys.executable, "-m", "pip"]
    names = [n for g in ["base", *groups] for n in DEVICE_WHEELS[g]]
    pins = [ROOT / "requirements" / "constraints.txt", *sorted(ROOT.glob("packages/*/requirements-test*.txt"))]  # test-only references are pinned there
    constraints = [x for p in pins for x in ("-c", str(p))]
    target = ["--python-version", "3.12", "--implementation", "cp", *(x for p in DEVICE_PLATFORMS for x in ("--platform", p))]
    for name in dict.fromkeys(names):
        try:
            session.run(*pip, "download", "-q", "--no-deps", "--only-binary=:all:", *target, *constraints, "-d", str(out), name, external=True, silent=True)
        except nox.command.CommandFailed:
            # no wheel published (antlr4-python3-runtime): build one from the sdist; only pure-Python ones get here
            session.run(*pip, "wheel", "-q", "--no-deps", *constraints, "-w", str(out), name, external=True)
    for d in PACKAGES:  # our own six, as wheels: the entry points need installed metadata
        session.run(*pip, "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT / "packages" / d), external=True)
    total = sum(f.stat().st_size for f in out.glob("*.whl"))
    session.log(f"{len(list(out.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {out}")
    if total > DEVICE_CARRY_LIMIT:
        session.error(f"{total / 2**20:.1f} MiB is over the {DEVICE_CARRY_LIMIT / 2**20:.0f} MiB a device run carries: take fewer groups per run")
