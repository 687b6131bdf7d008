"""3D inputs for Uni-Mol: RDKit ETKDG conformers, a disk cache filled by parallel
processes, and the featurisation into ``src_tokens / src_distance / src_coord / src_edge_type``.

What unimol_tools does, kept: hydrogens added before embedding (ETKDGv3, seeded), MMFF
optimisation when the force field covers the molecule, 2D coordinates when embedding
fails, hydrogens removed afterwards for no-H models, coordinates centred, [CLS] and [SEP]
placed at the origin. What we add: the 2D fall-backs are counted and reported (never
silent), the crop of molecules beyond ``max_atoms`` is seeded and counted, and results are
cached on disk so a second run does not embed again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from polyfm.mol.models.unimol import UniMolDictionary

log = logging.getLogger(__name__)


@dataclass
class Conformer:
    atoms: list[str]
    coordinates: NDArray[Any]  # (n_atoms, 3) float32
    is_3d: bool
    message: str = ""


@dataclass
class ConformerSettings:
    seed: int = 42
    remove_hs: bool = False
    mmff: bool = True
    max_attempts: int = 1000
    timeout: int = 10  # seconds per embedding attempt: large, flexible molecules can take minutes

    def key(self) -> str:
        return f"s{self.seed}-h{int(not self.remove_hs)}-m{int(self.mmff)}-a{self.max_attempts}-t{self.timeout:g}"


def embed_smiles(smiles: str, settings: ConformerSettings) -> Conformer:
    """One seeded ETKDG conformer of ``smiles`` (hydrogens added for embedding).

    On failure or timeout, random-coordinate embedding is tried, then 2D coordinates
    (``is_3d=False``, with the reason in ``message``)."""
    from rdkit import Chem, rdBase
    from rdkit.Chem import rdDepictor, rdDistGeom, rdForceFieldHelpers  # what AllChem re-exports, typed in RDKit's stubs

    rdBase.DisableLog("rdApp.*")
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"RDKit cannot parse SMILES {smiles!r}")
    mol = Chem.AddHs(mol)
    # Any: the stubs' EmbedParameters properties are untyped (*args) getters, read as taking the parameters object
    params: Any = rdDistGeom.ETKDGv3()
    params.randomSeed = settings.seed
    params.timeout = max(1, int(round(settings.timeout)))
    status = rdDistGeom.EmbedMolecule(mol, params)
    if status != 0:  # hard cases (macrocycles, cages): random starting coordinates, more attempts
        params.useRandomCoords = True
        params.maxIterations = settings.max_attempts
        status = rdDistGeom.EmbedMolecule(mol, params)
    message = ""
    if status == 0:
        # the MMFF typing is done once: it tells whether the force field covers the
        # molecule (None if not: the ETKDG geometry is kept) and sets up the optimisation
        properties = rdForceFieldHelpers.MMFFGetMoleculeProperties(mol) if settings.mmff else None
        if properties is not None:
            try:  # what MMFFOptimizeMolecule(mol) does, without typing the molecule again
                rdForceFieldHelpers.MMFFGetMoleculeForceField(mol, properties).Minimize(maxIts=200)
            except (RuntimeError, ValueError) as exc:  # keep the ETKDG geometry
                message = f"MMFF failed: {exc}"
        is_3d = True
    else:
        rdDepictor.Compute2DCoords(mol)
        is_3d = False
        message = "ETKDG embedding failed; 2D coordinates used"
    atoms = [atom.GetSymbol() for atom in mol.GetAtoms()]
    coords = mol.GetConformer().GetPositions().astype(np.float32)
    if settings.remove_hs:
        keep = [i for i, a in enumerate(atoms) if a != "H"]
        atoms, coords = [atoms[i] for i in keep], coords[keep]
    return Conformer(atoms, coords, is_3d, message)


def _cache_path(cache_dir: Path, smiles: str, settings: ConformerSettings) -> Path:
    digest = hashlib.sha1(f"{settings.key()}|{smiles}".encode()).hexdigest()
    return cache_dir / settings.key() / digest[:2] / f"{digest}.npz"


def _save(path: Path, conformer: Conformer) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    with os.fdopen(fd, "wb") as handle:
        np.savez(
            handle,
            atoms=np.array(conformer.atoms),
            coordinates=conformer.coordinates,
            is_3d=conformer.is_3d,
            message=conformer.message,
        )
    os.replace(tmp, path)


def _load(path: Path) -> Conformer:
    with np.load(path, allow_pickle=False) as data:
        return Conformer(
            [str(a) for a in data["atoms"]], data["coordinates"].astype(np.float32), bool(data["is_3d"]), str(data["message"])
        )


def _embed_job(args: tuple[str, ConformerSettings, str | None]) -> Conformer:
    smiles, settings, cache_dir = args
    conformer = embed_smiles(smiles, settings)
    if cache_dir is not None:
        _save(_cache_path(Path(cache_dir), smiles, settings), conformer)
    return conformer


@dataclass
class ConformerReport:
    total: int = 0
    from_cache: int = 0
    fallback_2d: list[int] = field(default_factory=list)

    def summary(self) -> str:
        return f"{self.total} conformers ({self.from_cache} from cache), {len(self.fallback_2d)} with 2D coordinates after ETKDG failed"


def _fill(
    jobs: Sequence[tuple[str, ConformerSettings]], cache: Path | None, workers: int
) -> tuple[list[Conformer], int]:
    """Conformers of ``(smiles, settings)`` jobs, in order: from the cache where present, the rest
    embedded in ``workers`` processes (one pool for all jobs) and written to the cache. Also how
    many came from the cache."""
    results: list[Conformer | None] = [None] * len(jobs)
    from_cache = 0
    todo: list[int] = []
    for i, (smi, settings) in enumerate(jobs):
        path = _cache_path(cache, smi, settings) if cache is not None else None
        if path is not None and path.exists():
            try:
                results[i] = _load(path)
                from_cache += 1
                continue
            except (OSError, ValueError, KeyError):  # a corrupt cache entry is recomputed
                log.warning("conformer cache entry %s is unreadable; recomputing", path)
        todo.append(i)
    work = [(jobs[i][0], jobs[i][1], None if cache is None else str(cache)) for i in todo]
    if workers > 1 and len(work) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            computed = list(pool.map(_embed_job, work, chunksize=max(1, len(work) // (4 * workers))))
    else:
        computed = [_embed_job(job) for job in work]
    for i, conformer in zip(todo, computed, strict=True):
        results[i] = conformer
    return [c for c in results if c is not None], from_cache


def generate_conformers(
    smiles: Sequence[str],
    settings: ConformerSettings | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int = 1,
) -> tuple[list[Conformer], ConformerReport]:
    """Conformers for ``smiles`` (in order), from the cache where present, the rest
    embedded in ``workers`` processes and written to the cache. Molecules that fell back to
    2D are logged with a count (their indices are in the report)."""
    settings = settings or ConformerSettings()
    cache = Path(cache_dir) if cache_dir is not None else None
    results, from_cache = _fill([(smi, settings) for smi in smiles], cache, workers)
    report = ConformerReport(total=len(smiles), from_cache=from_cache)
    report.fallback_2d = [i for i, c in enumerate(results) if not c.is_3d]
    if report.fallback_2d:
        log.warning(
            "%d of %d molecules fell back to 2D coordinates (ETKDG failed): indices %s",
            len(report.fallback_2d),
            len(smiles),
            report.fallback_2d[:20],
        )
    return results, report


def embed_2d(smiles: str, remove_hs: bool = False) -> Conformer:
    """RDKit 2D coordinates (z = 0) with hydrogens added, as the official Uni-Mol data scripts
    add as the last of a molecule's 11 conformers (``smi2_2Dcoords``); ``is_3d=False``."""
    from rdkit import Chem, rdBase
    from rdkit.Chem import rdDepictor  # what AllChem re-exports, typed in RDKit's stubs

    rdBase.DisableLog("rdApp.*")
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"RDKit cannot parse SMILES {smiles!r}")
    mol = Chem.AddHs(mol)
    rdDepictor.Compute2DCoords(mol)
    atoms = [atom.GetSymbol() for atom in mol.GetAtoms()]
    coords = mol.GetConformer().GetPositions().astype(np.float32)
    if remove_hs:
        keep = [i for i, a in enumerate(atoms) if a != "H"]
        atoms, coords = [atoms[i] for i in keep], coords[keep]
    return Conformer(atoms, coords, False, "2D coordinates (the 2D conformer)")


def distinct_geometries(conformers: Sequence[Conformer], tolerance: float = 1e-2) -> int:
    """How many of one molecule's conformers differ in geometry: two are the same when no
    interatomic distance differs by more than ``tolerance`` Angstrom (Uni-Mol sees distances,
    so a rotated or translated copy is no new conformer)."""
    kept: list[NDArray[Any]] = []
    for conformer in conformers:
        xyz = np.asarray(conformer.coordinates, np.float64)
        distances = np.linalg.norm(xyz[:, None, :] - xyz[None, :, :], axis=-1)
        if not any(d.shape == distances.shape and np.abs(d - distances).max(initial=0.0) <= tolerance for d in kept):
            kept.append(distances)
    return len(kept)


@dataclass
class ConformerSetReport:
    total: int = 0  # molecules
    per_molecule: int = 1
    from_cache: int = 0  # conformers
    fallback_2d: list[int] = field(default_factory=list)  # molecules of which an ETKDG seed fell back to 2D
    distinct: list[int] = field(default_factory=list)  # distinct geometries per molecule

    @property
    def repeated(self) -> list[int]:
        """Molecules with fewer distinct geometries than conformers (the repeats are kept)."""
        return [i for i, n in enumerate(self.distinct) if n < self.per_molecule]


def generate_conformer_sets(
    smiles: Sequence[str],
    count: int,
    settings: ConformerSettings | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int = 1,
    add_2d: bool = False,
) -> tuple[list[list[Conformer]], ConformerSetReport]:
    """``count`` conformers per molecule (Uni-Mol's multi-conformer protocol): ETKDG with seeds
    ``settings.seed``, ``settings.seed + 1``, ... (each cached as :func:`generate_conformers`
    caches one, so the first is the single-conformer path's), and with ``add_2d`` the last one
    RDKit's 2D coordinates instead (the official data: 10 ETKDG + 1 2D, ``conf_size=11``).

    A molecule always gets ``count`` conformers. When seeds give the same geometry (rigid or
    tiny molecules) the repeats are kept, so each seed keeps its weight in the average, and the
    molecules are counted in the report (``repeated``) and logged."""
    from dataclasses import replace

    settings = settings or ConformerSettings()
    cache = Path(cache_dir) if cache_dir is not None else None
    seeds = [settings.seed + k for k in range(count - int(add_2d))]
    jobs = [(smi, replace(settings, seed=seed)) for seed in seeds for smi in smiles]
    flat, from_cache = _fill(jobs, cache, workers)
    n = len(smiles)
    sets = [[flat[k * n + i] for k in range(len(seeds))] for i in range(n)]
    report = ConformerSetReport(total=n, per_molecule=count, from_cache=from_cache)
    report.fallback_2d = [i for i, confs in enumerate(sets) if any(not c.is_3d for c in confs)]
    if add_2d:
        for i, smi in enumerate(smiles):
            sets[i].append(embed_2d(smi, settings.remove_hs))
    report.distinct = [distinct_geometries(confs) for confs in sets]
    if report.fallback_2d:
        log.warning(
            "%d of %d molecules fell back to 2D coordinates for at least one ETKDG seed: indices %s",
            len(report.fallback_2d),
            n,
            report.fallback_2d[:20],
        )
    return sets, report


def unimol_features(
    atoms: Sequence[str],
    coordinates: NDArray[Any],
    dictionary: UniMolDictionary,
    max_atoms: int = 256,
    remove_hs: bool = False,
    seed: int = 0,
) -> dict[str, NDArray[Any]]:
    """Uni-Mol inputs of one molecule. Beyond ``max_atoms`` atoms, a seeded random
    subset of ``max_atoms`` is kept (as unimol_tools and the official cropping do)."""
    atoms = list(atoms)
    coords = np.asarray(coordinates, dtype=np.float32)
    if remove_hs:
        keep = [i for i, a in enumerate(atoms) if a != "H"]
        atoms, coords = [atoms[i] for i in keep], coords[keep]
    if len(atoms) > max_atoms:
        chosen = np.random.default_rng(seed).choice(len(atoms), max_atoms, replace=False)
        atoms, coords = [atoms[i] for i in chosen], coords[chosen]
    tokens = np.array([dictionary.bos, *(dictionary.index(a) for a in atoms), dictionary.eos], dtype=np.int64)
    centred = coords - coords.mean(axis=0) if len(coords) else coords
    src_coord = np.concatenate([np.zeros((1, 3), np.float32), centred, np.zeros((1, 3), np.float32)]).astype(np.float32)
    distance = np.linalg.norm(src_coord[:, None, :] - src_coord[None, :, :], axis=-1).astype(np.float32)
    edge = tokens[:, None] * len(dictionary) + tokens[None, :]
    return {"src_tokens": tokens, "src_distance": distance, "src_coord": src_coord, "src_edge_type": edge.astype(np.int64)}


def collate_unimol(samples: Sequence[Mapping[str, NDArray[Any] | torch.Tensor]], pad_idx: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of single-molecule features into a batch (tokens with [PAD], the rest with 0)."""
    length = max(len(s["src_tokens"]) for s in samples)
    batch = len(samples)
    tokens = torch.full((batch, length), pad_idx, dtype=torch.long)
    coord = torch.zeros(batch, length, 3)
    distance = torch.zeros(batch, length, length)
    edge = torch.zeros(batch, length, length, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["src_tokens"])
        tokens[i, :n] = torch.as_tensor(s["src_tokens"])
        coord[i, :n] = torch.as_tensor(s["src_coord"])
        distance[i, :n, :n] = torch.as_tensor(s["src_distance"])
        edge[i, :n, :n] = torch.as_tensor(s["src_edge_type"])
    return {"src_tokens": tokens, "src_distance": distance, "src_coord": coord, "src_edge_type": edge}
