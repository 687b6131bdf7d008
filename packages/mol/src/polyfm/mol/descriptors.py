"""ChemBERTa-2 MTR's label normalisation, read from a released checkpoint.

bert-loves-chemistry's ``RobertaForRegression`` keeps per-descriptor ``norm_mean`` /
``norm_std`` in its ``config.json`` (and as buffers in the weights); it trains the head on
``(descriptor - norm_mean) / norm_std`` (MSE, NaN/Inf descriptors set to 0 first) and
returns ``logits * norm_std + norm_mean`` at inference. Its labels are RDKit's
``Descriptors.descList`` of the day without ``Ipc``; the config only records how many
(``num_labels``), so the names come from that count (or from ``descriptor_names`` /
``id2label`` when a config carries them).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from polyfm.core.errors import CheckpointError

log = logging.getLogger(__name__)

# RDKit 2020.03's descList without Ipc, in its order: the 199 label columns of upstream's
# sample (chemberta/data/pubchem_descriptors_sample_1k_clean.csv, matched value by value
# against RDKit 2026.09 on its 999 molecules; see docs/mol.md)
CHEMBERTA2_DESCRIPTORS_199: tuple[str, ...] = tuple("""
    MaxEStateIndex MinEStateIndex MaxAbsEStateIndex MinAbsEStateIndex qed MolWt HeavyAtomMolWt ExactMolWt
    NumValenceElectrons NumRadicalElectrons MaxPartialCharge MinPartialCharge MaxAbsPartialCharge
    MinAbsPartialCharge FpDensityMorgan1 FpDensityMorgan2 FpDensityMorgan3 BalabanJ BertzCT Chi0 Chi0n Chi0v Chi1
    Chi1n Chi1v Chi2n Chi2v Chi3n Chi3v Chi4n Chi4v HallKierAlpha Kappa1 Kappa2 Kappa3 LabuteASA PEOE_VSA1
    PEOE_VSA10 PEOE_VSA11 PEOE_VSA12 PEOE_VSA13 PEOE_VSA14 PEOE_VSA2 PEOE_VSA3 PEOE_VSA4 PEOE_VSA5 PEOE_VSA6
    PEOE_VSA7 PEOE_VSA8 PEOE_VSA9 SMR_VSA1 SMR_VSA10 SMR_VSA2 SMR_VSA3 SMR_VSA4 SMR_VSA5 SMR_VSA6 SMR_VSA7
    SMR_VSA8 SMR_VSA9 SlogP_VSA1 SlogP_VSA10 SlogP_VSA11 SlogP_VSA12 SlogP_VSA2 SlogP_VSA3 SlogP_VSA4 SlogP_VSA5
    SlogP_VSA6 SlogP_VSA7 SlogP_VSA8 SlogP_VSA9 TPSA EState_VSA1 EState_VSA10 EState_VSA11 EState_VSA2
    EState_VSA3 EState_VSA4 EState_VSA5 EState_VSA6 EState_VSA7 EState_VSA8 EState_VSA9 VSA_EState1 VSA_EState10
    VSA_EState2 VSA_EState3 VSA_EState4 VSA_EState5 VSA_EState6 VSA_EState7 VSA_EState8 VSA_EState9
    FractionCSP3 HeavyAtomCount NHOHCount NOCount NumAliphaticCarbocycles NumAliphaticHeterocycles
    NumAliphaticRings NumAromaticCarbocycles NumAromaticHeterocycles NumAromaticRings NumHAcceptors NumHDonors
    NumHeteroatoms NumRotatableBonds NumSaturatedCarbocycles NumSaturatedHeterocycles NumSaturatedRings
    RingCount MolLogP MolMR fr_Al_COO fr_Al_OH fr_Al_OH_noTert fr_ArN fr_Ar_COO fr_Ar_N fr_Ar_NH fr_Ar_OH
    fr_COO fr_COO2 fr_C_O fr_C_O_noCOO fr_C_S fr_HOCCN fr_Imine fr_NH0 fr_NH1 fr_NH2 fr_N_O fr_Ndealkylation1
    fr_Ndealkylation2 fr_Nhpyrrole fr_SH fr_aldehyde fr_alkyl_carbamate fr_alkyl_halide fr_allylic_oxid
    fr_amide fr_amidine fr_aniline fr_aryl_methyl fr_azide fr_azo fr_barbitur fr_benzene fr_benzodiazepine
    fr_bicyclic fr_diazo fr_dihydropyridine fr_epoxide fr_ester fr_ether fr_furan fr_guanido fr_halogen
    fr_hdrzine fr_hdrzone fr_imidazole fr_imide fr_isocyan fr_isothiocyan fr_ketone fr_ketone_Topliss fr_lactam
    fr_lactone fr_methoxy fr_morpholine fr_nitrile fr_nitro fr_nitro_arom fr_nitro_arom_nonortho fr_nitroso
    fr_oxazole fr_oxime fr_para_hydroxylation fr_phenol fr_phenol_noOrthoHbond fr_phos_acid fr_phos_ester
    fr_piperdine fr_piperzine fr_priamide fr_prisulfonamd fr_pyridine fr_quatN fr_sulfide fr_sulfonamd
    fr_sulfone fr_term_acetylene fr_tetrazole fr_thiazole fr_thiocyan fr_thiophene fr_unbrch_alkane fr_urea
""".split())
_BCUT2D = tuple(f"BCUT2D_{s}" for s in ("MWHI", "MWLOW", "CHGHI", "CHGLO", "LOGPHI", "LOGPLOW", "MRHI", "MRLOW"))
# RDKit 2020.09-2022.03 (208 descriptors: the 8 BCUT2D after FpDensityMorgan3) without Ipc: upstream's
# normalization_values_207.json. Not checked value by value (upstream ships no 207-column sample).
_AT = CHEMBERTA2_DESCRIPTORS_199.index("FpDensityMorgan3") + 1
CHEMBERTA2_DESCRIPTORS_207: tuple[str, ...] = CHEMBERTA2_DESCRIPTORS_199[:_AT] + _BCUT2D + CHEMBERTA2_DESCRIPTORS_199[_AT:]
LABEL_SETS = {199: CHEMBERTA2_DESCRIPTORS_199, 207: CHEMBERTA2_DESCRIPTORS_207}

# descriptors whose RDKit definition changed since (SMARTS patterns): on upstream's 999-molecule
# sample, RDKit 2026.09 gives another value for this many molecules
CHANGED_SINCE_RELEASE = {"NumHAcceptors": 196, "fr_unbrch_alkane": 96, "fr_prisulfonamd": 3}


@dataclass
class ReleasedNormalisation:
    """``names``, ``mean`` and ``std`` (zeros replaced by 1, as upstream does) of a released MTR head."""

    names: list[str]
    mean: NDArray[Any]
    std: NDArray[Any]
    source: str

    def transform(self, values: NDArray[Any]) -> NDArray[Any]:
        """Upstream's training labels: NaN/Inf descriptors set to 0, then ``(x - mean) / std``."""
        clean = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        out: NDArray[Any] = ((clean - self.mean) / self.std).astype(np.float32)
        return out

    def inverse(self, scaled: NDArray[Any]) -> NDArray[Any]:
        out: NDArray[Any] = np.asarray(scaled, dtype=np.float64) * self.std + self.mean
        return out


def released_folder(source: str | os.PathLike[str]) -> Path:
    """A hub folder: the path itself (or the folder of a config.json / weights file), or a registered
    name fetched into the cache (``polyfm weights fetch chemberta-2-77m-mtr``)."""
    path = Path(source).expanduser()
    if path.exists():
        return path if path.is_dir() else path.parent
    from polyfm.core.weights import fetch_weights, get_weights

    return Path(fetch_weights(get_weights(str(source))))


def _weights_file(folder: Path) -> Path | None:
    return next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).exists()), None)


def load_released_state(folder: Path) -> dict[str, torch.Tensor]:
    from polyfm.core.weights import load_checkpoint_file, unwrap_state_dict

    weights = _weights_file(folder)
    if weights is None:
        raise CheckpointError(f"{folder} has neither model.safetensors nor pytorch_model.bin.")
    state: dict[str, torch.Tensor] = unwrap_state_dict(load_checkpoint_file(weights))
    return state


def label_names(config: dict[str, Any], count: int, where: str) -> list[str]:
    """The descriptor of each output: ``descriptor_names`` or a named ``id2label`` when the config
    has them, else upstream's set of that size."""
    names = config.get("descriptor_names")
    id2label = config.get("id2label") or {}
    if names is None and id2label and not all(str(v).startswith("LABEL_") for v in id2label.values()):
        names = [id2label[k] for k in sorted(id2label, key=int)]
    if names is None:
        if count not in LABEL_SETS:
            raise CheckpointError(
                f"{where}: {count} regression outputs and no descriptor names (descriptor_names or id2label). "
                f"ChemBERTa-2's label sets have {' or '.join(map(str, LABEL_SETS))} descriptors (RDKit's descList without "
                "Ipc, RDKit 2020.03 or 2020.09); add the names in output order as \"descriptor_names\" to the config."
            )
        names = list(LABEL_SETS[count])
    if len(names) != count:
        raise CheckpointError(f"{where}: {len(names)} descriptor names for {count} regression outputs.")
    from rdkit.Chem import Descriptors

    known = {n for n, _ in Descriptors.descList}
    missing = [n for n in names if n not in known]
    if missing:
        import rdkit

        raise CheckpointError(
            f"{where}: RDKit {rdkit.__version__} has no descriptor {', '.join(missing)}; the head's targets cannot be "
            "computed. Use the RDKit the checkpoint was trained with, or drop those outputs."
        )
    return list(names)


def released_normalisation(source: str | os.PathLike[str]) -> ReleasedNormalisation:
    """``norm_mean`` / ``norm_std`` of a released ChemBERTa-2 MTR checkpoint and the descriptor names.

    The weights' buffers win over ``config.json``'s lists (``from_pretrained`` loads them last);
    an MLM or classification checkpoint (no ``norm_mean``) is an error."""
    folder = released_folder(source)
    config_file = folder / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{folder} has no config.json; an MTR checkpoint needs the hub folder layout.")
    config = json.loads(config_file.read_text())
    mean, std = config.get("norm_mean"), config.get("norm_std")
    state = load_released_state(folder) if _weights_file(folder) is not None else {}
    if "norm_mean" in state and "norm_std" in state:
        mean, std = state["norm_mean"].double().tolist(), state["norm_std"].double().tolist()
    if mean is None or std is None:
        raise CheckpointError(
            f"{config_file} has no norm_mean/norm_std: not a ChemBERTa-2 MTR checkpoint (RobertaForRegression). "
            "Use chemberta-2-77m-mtr, or targets='descriptors' without descriptors_from to standardise with your data."
        )
    if len(mean) != len(std):
        raise CheckpointError(f"{config_file}: norm_mean has {len(mean)} values, norm_std {len(std)}.")
    names = label_names(config, len(mean), str(config_file))
    changed = [n for n in names if CHANGED_SINCE_RELEASE.get(n)]
    if changed:
        log.warning(
            "%s: RDKit changed the definition of %s since ChemBERTa-2 was trained (another value for %s of 999 molecules "
            "of its sample); those targets are computed with this RDKit.",
            source, ", ".join(changed), ", ".join(str(CHANGED_SINCE_RELEASE[n]) for n in changed),
        )  # fmt: skip
    std_array = np.asarray(std, dtype=np.float64)
    std_array[std_array == 0] = 1.0  # what RobertaForRegression does
    return ReleasedNormalisation(names, np.asarray(mean, dtype=np.float64), std_array, str(source))


__all__ = [
    "CHEMBERTA2_DESCRIPTORS_199",
    "CHEMBERTA2_DESCRIPTORS_207",
    "ReleasedNormalisation",
    "released_normalisation",
]
