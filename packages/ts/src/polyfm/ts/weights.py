"""The released TTM checkpoints (IBM granite-tsfm, Hugging Face hub).

Every variant is a hub folder: ``config.json`` (granite-tsfm ``TinyTimeMixerConfig``)
and ``model.safetensors`` whose keys are exactly our module names (no converter needed).
Variants other than 512-96 live on branches of the same repository. The hub publishes
no separate checksums for these files, so they are recorded unverified (sha256 None).

    TTM.from_pretrained("ttm-r2-512-96")                        # registry name
    TTM.from_pretrained("ibm-granite/granite-timeseries-ttm-r2")  # hub id (its main branch)
    TTM.from_pretrained("1024-96-r2")                           # granite-tsfm get_model key
    TTM.from_pretrained("/path/to/folder")                      # config.json + model.safetensors
"""

from __future__ import annotations

from polyfm.core.weights import WeightSpec

HF = "https://huggingface.co"
R1 = "ibm-granite/granite-timeseries-ttm-r1"
R2 = "ibm-granite/granite-timeseries-ttm-r2"

# (release, hub repository, branch, context length, forecast length)
_VARIANTS: list[tuple[str, str, str, int, int]] = [
    ("r1", R1, "main", 512, 96),
    ("r1", R1, "1024_96_v1", 1024, 96),
    *[("r2", R2, "main" if (c, h) == (512, 96) else f"{c}-{h}-r2", c, h) for c in (512, 1024, 1536) for h in (96, 192, 336, 720)],
    # r2.1: frequency-prefix ("-ft") models for daily/weekly data; "-l1" ones were trained with MAE loss
    *[("r2.1", R2, f"{c}-{h}-ft-r2.1", c, h) for c, h in ((52, 16), (90, 30), (512, 48), (512, 96))],
    *[("r2.1", R2, f"{c}-{h}-ft-l1-r2.1", c, h) for c, h in ((52, 16), (90, 30), (180, 60), (360, 60), (512, 48), (512, 96))],
]


def _tags(branch: str) -> str:
    """'-ft' (frequency prefix tuning) and '-l1' (MAE loss) as the branch names them."""
    return ("-ft" if "-ft-" in branch else "") + ("-l1" if "-l1-" in branch else "")


def _name(release: str, context: int, horizon: int, branch: str) -> str:
    return f"ttm-{release}-{context}-{horizon}{_tags(branch)}"


def _granite_key(release: str, context: int, horizon: int, branch: str) -> str:
    """The model key of granite-tsfm's get_model (resources/model_paths_config/ttm.yaml)."""
    return f"{context}-{horizon}{_tags(branch)}-{release}"


def _spec(release: str, repo: str, branch: str, context: int, horizon: int) -> WeightSpec:
    files = {name: (f"{HF}/{repo}/resolve/{branch}/{name}", None) for name in ("model.safetensors", "config.json")}
    return WeightSpec(
        name=_name(release, context, horizon, branch),
        family="ttm",
        files=files,
        license="apache-2.0",
        meta={
            "hub_repo": repo,
            "revision": branch,
            "release": release,
            "context_length": context,
            "prediction_length": horizon,
            # TTM standardises each context window itself (std scaler inside the model); the
            # granite-tsfm recipes also standard-scale every channel with train-split statistics.
            "scaling": "per-window std inside the model; data standard-scaled with train statistics",
            "frequency_tokens": "polyfm.ts.models.ttm.FREQUENCY_TOKENS (only for resolution_prefix_tuning configs)",
        },
        description=f"Tiny Time Mixer {release}, context {context}, forecast {horizon} ({repo}@{branch})",
    )


WEIGHTS: list[WeightSpec] = [_spec(*variant) for variant in _VARIANTS]

# Hub ids (optionally with @branch) and granite-tsfm's get_model keys ("1024-96-r2", "52-16-ft-r2.1")
# -> registry names, so granite-tsfm users' names work.
HUB_ALIASES: dict[str, str] = {}
for _release, _repo, _branch, _context, _horizon in _VARIANTS:
    _registry = _name(_release, _context, _horizon, _branch)
    HUB_ALIASES[f"{_repo}@{_branch}"] = _registry
    HUB_ALIASES[_granite_key(_release, _context, _horizon, _branch)] = _registry
    if _branch == "main":
        HUB_ALIASES[_repo] = _registry
