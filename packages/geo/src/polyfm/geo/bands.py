"""Band awareness: names, wavelengths, normalisation, and mapping an input's bands onto a model's.

Every weight in :mod:`polyfm.geo.weights` declares its bands by name and order, their
central wavelengths and its normalisation. An input with another band set goes
through :func:`plan_bands`:

* bands the model knows are **selected and reordered** by name (``"red"`` is ``B4``);
* bands the input has and the model does not are dropped (listed in the plan);
* bands the model needs and the input lacks are handled by an explicit policy,
  applied to the **patch-embedding weights** (never by zero-filling the input):

  - ``"error"`` (default): raise, listing both band lists;
  - ``"nearest"``: the missing band's kernel is folded onto the spectrally nearest
    band the input has (the same as imputing the missing band with that band's
    normalised values);
  - ``"mean"``: the missing band's kernel is removed and its contribution at the
    band's training mean (its normalised mean value) is folded into the bias, the
    same as feeding the band constant at its mean.

  A group-channel model (SatMAE) drops the tokens of a spectral group none of whose
  bands are present: pretraining saw 75% of tokens missing, so this is in
  distribution; its other groups keep their channel-group encoding.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from polyfm.core.errors import ConfigError, DataError

MissingBands = Literal["error", "nearest", "mean"]

# Central wavelengths in nanometres (Sentinel-2A MSI, ESA). SAR bands have none.
SENTINEL2_WAVELENGTHS: dict[str, float] = {
    "B1": 442.7, "B2": 492.4, "B3": 559.8, "B4": 664.6, "B5": 704.1, "B6": 740.5, "B7": 782.8,
    "B8": 832.8, "B8A": 864.7, "B9": 945.1, "B10": 1373.5, "B11": 1613.7, "B12": 2202.4,
}
SENTINEL2_BANDS: list[str] = list(SENTINEL2_WAVELENGTHS)
SENTINEL1_BANDS: list[str] = ["VV", "VH"]

# Common names -> Sentinel-2 band names, so an RGB file's "red" finds B4.
BAND_ALIASES: dict[str, str] = {
    "COASTAL": "B1", "AEROSOL": "B1", "BLUE": "B2", "B": "B2", "GREEN": "B3", "G": "B3", "RED": "B4", "R": "B4",
    "REDEDGE1": "B5", "RE1": "B5", "REDEDGE2": "B6", "RE2": "B6", "REDEDGE3": "B7", "RE3": "B7",
    "NIR": "B8", "NIR08": "B8", "NARROWNIR": "B8A", "NIR_NARROW": "B8A", "REDEDGE4": "B8A", "RE4": "B8A",
    "WATERVAPOUR": "B9", "WATER_VAPOR": "B9", "CIRRUS": "B10", "SWIR1": "B11", "SWIR16": "B11",
    "SWIR2": "B12", "SWIR22": "B12",
}


def canonical_band(name: str) -> str:
    """``"b02"``, ``"B2"``, ``"red"``, ``"B8a"`` -> ``"B2"``, ``"B2"``, ``"B4"``, ``"B8A"``."""
    key = re.sub(r"[\s\-]", "", str(name)).upper()
    key = BAND_ALIASES.get(key, key)
    match = re.fullmatch(r"B0*(\d+)(A?)", key)
    if match:
        return f"B{int(match.group(1))}{match.group(2)}"
    return key


def wavelength(name: str) -> float | None:
    return SENTINEL2_WAVELENGTHS.get(canonical_band(name))


@dataclass(frozen=True)
class Normalization:
    """How raw values (e.g. reflectance x 10,000, or SAR dB) become model inputs.

    * ``kind="meanstd"``: ``(x - mean) / std``;
    * ``kind="sigma2"``: SatMAE's / SSL4EO-S12's scaling: ``(x - (mean - 2 std)) / (4 std)``
      clipped to [0, 1]; with ``quantize`` the official uint8 step (``* 255``, truncate,
      ``/ 255`` by ``ToTensor``) is reproduced exactly;
    * ``kind="scale"``: ``x / divisor`` (e.g. 10,000 for reflectance).
    """

    kind: Literal["meanstd", "sigma2", "scale"]
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    divisor: float = 1.0
    quantize: bool = False

    def select(self, indices: Sequence[int]) -> Normalization:
        if self.kind == "scale":
            return self
        return Normalization(self.kind, tuple(self.mean[i] for i in indices), tuple(self.std[i] for i in indices), self.divisor, self.quantize)

    def normalised_mean(self) -> list[float]:
        """What each band's training mean becomes after normalisation (for ``missing="mean"``)."""
        if self.kind == "meanstd":
            return [0.0] * len(self.mean)
        if self.kind == "sigma2":
            return [0.5] * len(self.mean)
        return [0.0] * len(self.mean)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` of shape ``(..., C, H, W)`` with C the bands of this normalisation."""
        x = x.float()
        if self.kind == "scale":
            return x / self.divisor
        channels = x.shape[-3]
        if channels != len(self.mean):
            raise DataError(f"normalisation has {len(self.mean)} bands but the input has {channels} channels")
        shape = (-1, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float64, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=torch.float64, device=x.device).view(shape)
        # float64 as the official pipelines compute it; in place on one working copy
        work = x.double()
        if self.kind == "meanstd":
            return work.sub_(mean).div_(std).float()
        work.sub_(mean - 2 * std).div_(4 * std)
        if self.quantize:
            return work.mul_(255.0).clamp_(0, 255).floor_().div_(255.0).float()
        return work.clamp_(0, 1).float()

    def to_meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "mean": list(self.mean), "std": list(self.std), "divisor": self.divisor, "quantize": self.quantize}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Normalization:
        return cls(
            kind=meta["kind"],
            mean=tuple(float(v) for v in meta.get("mean", ())),
            std=tuple(float(v) for v in meta.get("std", ())),
            divisor=float(meta.get("divisor", 1.0)),
            quantize=bool(meta.get("quantize", False)),
        )


@dataclass
class BandPlan:
    """How an input's bands feed a model: which input channel each model band reads.

    ``source[i]`` is the input channel for model band ``i`` (its own band, or the proxy
    chosen by ``"nearest"``), or ``None`` when the band is filled by its mean.
    ``used`` lists the input channels the model reads, in input order; ``dropped``
    the input bands the model does not use.
    """

    input_bands: list[str]
    model_bands: list[str]
    source: list[int | None]
    missing: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    policy: MissingBands = "error"

    @property
    def used(self) -> list[int]:
        return sorted({s for s in self.source if s is not None} | {i for i, b in enumerate(self.input_bands) if b in self.model_bands})

    @property
    def present(self) -> list[bool]:
        """Whether each model band is really in the input (not proxied, not mean-filled)."""
        return [b in self.input_bands for b in self.model_bands]

    def describe(self) -> str:
        lines = [f"model bands: {self.model_bands}", f"input bands: {self.input_bands}"]
        for band, src in zip(self.model_bands, self.source, strict=True):
            if band in self.missing:
                lines.append(f"  {band}: missing -> " + (f"kernel folded onto {self.input_bands[src]}" if src is not None else "mean value in the bias"))
        if self.dropped:
            lines.append(f"  unused input bands: {self.dropped}")
        return "\n".join(lines)


def band_mismatch_message(input_bands: Sequence[str], model_bands: Sequence[str], missing: Sequence[str], what: str = "the weights") -> str:
    return (
        f"The input bands do not cover the bands of {what}.\n"
        f"  input bands ({len(input_bands)}): {list(input_bands)}\n"
        f"  model bands ({len(model_bands)}): {list(model_bands)}\n"
        f"  missing from the input: {list(missing)}\n"
        "Pass missing_bands='nearest' (fold each missing band's patch-embedding kernel onto the spectrally "
        "nearest input band) or missing_bands='mean' (treat it as constant at its training mean), or give "
        "the input's band names if they are mislabelled."
    )


def plan_bands(input_bands: Sequence[str], model_bands: Sequence[str], missing: MissingBands = "error") -> BandPlan:
    """Match ``input_bands`` to ``model_bands`` by name; see the module docstring for the policies."""
    if missing not in ("error", "nearest", "mean"):
        raise ConfigError(f"missing_bands must be 'error', 'nearest' or 'mean', got {missing!r}")
    inputs = [canonical_band(b) for b in input_bands]
    model = [canonical_band(b) for b in model_bands]
    duplicates = sorted({b for b in inputs if inputs.count(b) > 1})
    if duplicates:
        raise DataError(f"input band list {list(input_bands)} names {duplicates} more than once")
    absent = [b for b in model if b not in inputs]
    if absent and missing == "error":
        raise DataError(band_mismatch_message(inputs, model, absent))
    if absent and not any(b in model for b in inputs) and missing == "nearest" and not any(wavelength(b) for b in inputs):
        raise DataError(band_mismatch_message(inputs, model, absent) + "\nNo input band has a known wavelength to stand in.")
    source: list[int | None] = []
    for band in model:
        if band in inputs:
            source.append(inputs.index(band))
        elif missing == "nearest":
            source.append(_nearest(band, inputs))
        else:
            source.append(None)
    dropped = [b for b in inputs if b not in model]
    return BandPlan(inputs, model, source, absent, dropped, missing)


def _nearest(band: str, inputs: list[str]) -> int:
    target = wavelength(band)
    candidates = [(i, wavelength(b)) for i, b in enumerate(inputs)]
    known = [(i, w) for i, w in candidates if w is not None]
    if target is None or not known:
        raise DataError(
            f"cannot choose a stand-in for band {band!r}: no wavelength known for it or for the input bands {inputs}. "
            "Use missing_bands='mean' instead."
        )
    return min(known, key=lambda iw: abs(iw[1] - target))[0]


def remap_in_channels(
    weight: torch.Tensor,
    plan: BandPlan,
    model_band_subset: Sequence[str],
    normalised_mean: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Rewrite a first-layer kernel whose input channels are ``model_band_subset`` (a
    subset of ``plan.model_bands``, e.g. one SatMAE group) for the input of ``plan``.

    Returns ``(new_weight, bias_delta, input_channels)``: ``new_weight`` reads the input
    channels ``input_channels`` (indices into ``plan.input_bands``) in that order, and
    ``bias_delta`` (per output channel) must be added to the layer's bias (the
    ``"mean"`` policy). Kernels are folded, never zero-filled.
    """
    subset = [canonical_band(b) for b in model_band_subset]
    sources = [plan.source[plan.model_bands.index(b)] for b in subset]
    channels = sorted({s for s in sources if s is not None})
    new = weight.new_zeros((weight.shape[0], len(channels), *weight.shape[2:]))
    bias = weight.new_zeros(weight.shape[0])
    for k, (band, src) in enumerate(zip(subset, sources, strict=True)):
        if src is not None:
            new[:, channels.index(src)] += weight[:, k]
        else:
            level = normalised_mean[plan.model_bands.index(band)] if normalised_mean is not None else 0.0
            bias += weight[:, k].sum(dim=tuple(range(1, weight.ndim - 1))) * level
    return new, bias, channels


def conv_like(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A fresh ``Conv2d`` with ``conv``'s kernel, stride, padding and bias flag reading
    ``in_channels`` channels, on ``conv``'s device (the first layer after :func:`remap_in_channels`)."""
    kernel, stride = conv.kernel_size, conv.stride  # torch stores these as tuple[int, ...]; a Conv2d's hold two
    padding = conv.padding if isinstance(conv.padding, str) else (conv.padding[0], conv.padding[1])
    new = nn.Conv2d(in_channels, conv.out_channels, (kernel[0], kernel[1]), (stride[0], stride[1]), padding, bias=conv.bias is not None)
    return new.to(conv.weight.device)


def normalization_for(input_bands: Sequence[str], model_bands: Sequence[str], normalization: Normalization | None) -> Normalization | None:
    """The weights' normalisation laid out for ``input_bands``: each band the model
    knows gets its own statistics; bands it does not use get (0, 1) (the model's
    first layer has zero kernels for them, so their values do not matter)."""
    if normalization is None or normalization.kind == "scale":
        return normalization
    model = [canonical_band(b) for b in model_bands]
    stats = [
        (normalization.mean[model.index(b)], normalization.std[model.index(b)]) if b in model else (0.0, 1.0)
        for b in (canonical_band(b) for b in input_bands)
    ]
    return Normalization(normalization.kind, tuple(m for m, _ in stats), tuple(v for _, v in stats), normalization.divisor, normalization.quantize)


def resolve_normalization(value: Any, input_bands: Sequence[str]) -> Normalization | None:
    """``value`` as a Normalization for ``input_bands``: a Normalization, its dict, or the
    name of a registered weight (its meta's bands and normalisation are used)."""
    if value is None or isinstance(value, Normalization):
        return value
    if isinstance(value, str):
        from polyfm.core.weights import get_weights

        meta = get_weights(value).meta
        return normalization_for(input_bands, meta["bands"], Normalization.from_meta(meta["normalization"]))
    if isinstance(value, Mapping):
        return Normalization.from_meta(value)
    raise ConfigError(f"normalization must be a weight name, a dict or a Normalization, got {type(value).__name__}")
