"""Transfer studies: a grid of sources x targets x adaptations x label fractions x seeds.

A study is a YAML file (or a dict). Each run is keyed by a hash of its resolved
configuration: a finished run (its ``runs/<key>.json`` exists) is never run again, so
a killed study resumes where it stopped. Each result is written atomically (temp file,
rename), and the table, summary and plots are rebuilt from those files.

    name: my-study
    output: reports/my-study
    quick: false
    targets: [{domain: audio}, {domain: ts, data_dir: /data}, {domain: audio, trunk: true}]
    sources: [scratch, pretrained, "checkpoint:/path/encoder.safetensors", "weights:satmae-vit-base"]
    adaptations: [{mode: full}, {mode: linear}, {mode: lora, lora_rank: 8}, {mode: freeze, freeze_blocks: 2}]
    label_fractions: [0.1, 1.0]
    seeds: [0, 1, 2]
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from polyfm.core.errors import ConfigError
from polyfm.core.files import atomic_path

SOURCE_KINDS = ("scratch", "pretrained", "checkpoint:", "weights:")


@dataclass
class StudyConfig:
    name: str = "study"
    output: str = "reports/study"
    targets: list[dict[str, Any]] = field(default_factory=list)
    sources: list[str] = field(default_factory=lambda: ["scratch", "pretrained"])
    adaptations: list[dict[str, Any]] = field(default_factory=lambda: [{"mode": "full"}])
    label_fractions: list[float] = field(default_factory=lambda: [1.0])
    seeds: list[int] = field(default_factory=lambda: [0])
    quick: bool = False
    data_dir: str | None = None

    @classmethod
    def load(cls, path: Path) -> StudyConfig:
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"Cannot read study file {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a study file is a mapping with keys {sorted(cls.__dataclass_fields__)}.")
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}.")
        _check_types(raw, str(path))
        config = cls(**raw)
        config.validate(str(path))
        return config

    def validate(self, where: str = "study") -> None:
        if not self.targets:
            raise ConfigError(f"{where}: 'targets' is empty; list domains, e.g. targets: [{{domain: audio}}].")
        for index, target in enumerate(self.targets):
            if not isinstance(target, dict) or "domain" not in target:
                raise ConfigError(f"{where}: targets[{index}] = {target!r} needs a 'domain' key.")
            if target.get("trunk"):
                if not any(s.startswith(("checkpoint:", "weights:")) for s in self.sources):
                    raise ConfigError(f"{where}: targets[{index}] uses a transformer trunk; add a checkpoint: or weights: source to take its blocks from.")
                if "pretrained" in self.sources:
                    raise ConfigError(f"{where}: targets[{index}] uses a transformer trunk; the 'pretrained' source pretrains the domain's own encoder, "
                                      "not a trunk. Give a checkpoint: or weights: source instead.")
        for source in self.sources:
            if not (source in ("scratch", "pretrained") or source.startswith(("checkpoint:", "weights:"))):
                raise ConfigError(f"{where}: source {source!r} is not one of scratch, pretrained, checkpoint:<path>, weights:<name>.")
        for fraction in self.label_fractions:
            if not 0 < float(fraction) <= 1:
                raise ConfigError(f"{where}: label fraction {fraction} is not in (0, 1].")
        from polyfm.core.adaptation import Adaptation

        for adaptation in self.adaptations:
            try:
                Adaptation(**adaptation)
            except (TypeError, ConfigError) as exc:
                raise ConfigError(f"{where}: adaptation {adaptation!r}: {exc}") from exc

    def runs(self) -> list[dict[str, Any]]:
        """The grid, one resolved configuration per run."""
        grid = []
        for target in self.targets:
            for source in self.sources:
                for adaptation in self.adaptations:
                    for fraction in self.label_fractions:
                        for seed in self.seeds:
                            grid.append(
                                {
                                    **({"trunk": True} if target.get("trunk") else {}),
                                    "domain": target["domain"],
                                    "data_dir": target.get("data_dir", self.data_dir),
                                    "source": source,
                                    "adaptation": dict(adaptation),
                                    "label_fraction": float(fraction),
                                    "seed": int(seed),
                                    "quick": self.quick,
                                }
                            )
        return grid


_FIELD_TYPES: dict[str, tuple[type, type | tuple[type, ...] | None]] = {
    "name": (str, None),
    "output": (str, None),
    "targets": (list, dict),
    "sources": (list, str),
    "adaptations": (list, dict),
    "label_fractions": (list, (int, float)),
    "seeds": (list, int),
    "quick": (bool, None),
    "data_dir": (str, None),
}


def _check_types(raw: dict[str, Any], where: str) -> None:
    for key, value in raw.items():
        outer, inner = _FIELD_TYPES[key]
        if key == "data_dir" and value is None:
            continue
        if not isinstance(value, outer) or (outer is not bool and isinstance(value, bool)):
            raise ConfigError(f"{where}: '{key}' must be a {outer.__name__}, got {type(value).__name__} ({value!r:.80}).")
        if inner is not None:
            items: list[Any] = value  # type: ignore[assignment]  # checked by isinstance(value, outer) above
            for index, item in enumerate(items):
                if not isinstance(item, inner) or isinstance(item, bool):
                    raise ConfigError(f"{where}: {key}[{index}] = {item!r:.80} has the wrong type; see docs/studies.md for the format.")


def run_key(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json_atomic(path: Path, payload: Any) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=1, default=str))


# ----------------------------------------------------------------------------- one run


def _quiet_lightning() -> None:
    import logging
    import warnings

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")


def pretrained_encoder_path(output: Path, domain: str, data_dir: str | None, quick: bool, seed: int) -> Path:
    key = run_key({"pretrain": domain, "data_dir": data_dir, "quick": quick, "seed": seed})
    return output / "pretrained" / f"{domain}-{key}.safetensors"


def pretrain_domain(output: Path, domain: str, data_dir: str | None, quick: bool, seed: int = 0) -> dict[str, Any]:
    """Pretrain the domain's encoder with its own objective once; cached on disk."""
    import lightning as L
    import torch

    from polyfm.core.kit import load_kit
    from polyfm.core.trainer import build_trainer
    from polyfm.core.weights import save_safetensors

    path = pretrained_encoder_path(output, domain, data_dir, quick, seed)
    info_path = path.with_suffix(".json")
    if path.exists() and info_path.exists():
        return dict(json.loads(info_path.read_text()))
    _quiet_lightning()
    kit = load_kit(domain, Path(data_dir) if data_dir else None, quick=quick)
    L.seed_everything(seed, verbose=False)
    encoder = kit.make_encoder()
    module = kit.make_pretraining(encoder)
    trainer = build_trainer(
        max_epochs=kit.pretrain_epochs, default_root_dir=str(output / "pretrain-logs" / domain), enable_progress_bar=False,
        loggers=("csv",), enable_checkpointing=False, log_every_n_steps=1, enable_model_summary=False,
    )
    start = time.time()
    module.train()  # Lightning 2.6 keeps each module's mode: a kit's eval-mode model would train in eval mode
    trainer.fit(module, kit.make_pretrain_data())
    losses = _logged_losses(trainer)
    save_safetensors({k: v for k, v in encoder.state_dict().items() if isinstance(v, torch.Tensor)}, path)
    info = {"domain": domain, "path": str(path), "seconds": time.time() - start, "epochs": kit.pretrain_epochs, **losses}
    write_json_atomic(info_path, info)
    return info


def _logged_losses(trainer: Any) -> dict[str, float]:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 0)() == 1}
    return {f"pretrain_{k.replace('/', '_')}": v for k, v in metrics.items() if "loss" in k}


def source_state(source: str) -> tuple[dict[str, Any], str]:
    """The state dict behind a checkpoint: or weights: source, in our key layout."""
    from polyfm.core.weights import fetch_weights, get_weights, load_checkpoint_file, unwrap_state_dict

    if source.startswith("checkpoint:"):
        path = Path(source.split(":", 1)[1]).expanduser()
        return unwrap_state_dict(load_checkpoint_file(path)), str(path)
    spec = get_weights(source.split(":", 1)[1])
    state = unwrap_state_dict(load_checkpoint_file(fetch_weights(spec) / spec.primary_file))
    return (spec.converter(state) if spec.converter else state), spec.name


def trunk_architecture(sources: list[str], head_dim: int = 64) -> dict[str, Any]:
    """Trunk shape shared by every source of a trunk target (scratch included), read from
    the first checkpoint:/weights: source, so that scratch and transfer compare like for like."""
    from polyfm.core.transfer import trunk_config

    first = next(s for s in sources if s.startswith(("checkpoint:", "weights:")))
    state, _ = source_state(first)
    return trunk_config(state, head_dim=head_dim)


def build_encoder(kit: Any, run: dict[str, Any]) -> Any:
    if not run.get("trunk"):
        return kit.make_encoder()
    if kit.make_trunk_encoder is None:
        raise ConfigError(f"The {run['domain']} kit has no transformer-trunk encoder (make_trunk_encoder); "
                          "cross-domain trunks are possible for domains whose kit provides one (see docs/studies.md).")
    return kit.make_trunk_encoder(run["trunk_architecture"])


def load_source(encoder: Any, source: str, output: Path, run: dict[str, Any]) -> None:
    """Put the source's weights into a freshly built (scratch) encoder."""
    from polyfm.core.weights import load_checkpoint_file, load_state_dict_checked, unwrap_state_dict

    if source == "scratch":
        return
    from polyfm.core.adaptation import head_prefixes

    head = head_prefixes(encoder)  # a model's own output head is task-specific: never transferred

    def without_head(state: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in state.items() if not any(k == p or k.startswith(p + ".") for p in head)}

    if source == "pretrained":
        path = pretrained_encoder_path(output, run["domain"], run["data_dir"], run["quick"], 0)
        state = unwrap_state_dict(load_checkpoint_file(path))
        load_state_dict_checked(encoder, without_head(state), strict=True, ignore_missing=head, source=str(path))
        return
    if source.startswith(("checkpoint:", "weights:")):
        state, name = source_state(source)
        if hasattr(encoder, "load_trunk"):  # cross-domain trunks map keys themselves
            encoder.load_trunk(state, source=name)
        else:
            load_state_dict_checked(encoder, without_head(state), strict=False, source=name)
        return
    raise ConfigError(f"Unknown source {source!r}.")


def execute_run(run: dict[str, Any], output: str) -> dict[str, Any]:
    """Fine-tune one grid point and return its row. Runs in a worker process too."""
    import lightning as L

    from polyfm.core.adaptation import Adaptation
    from polyfm.core.kit import load_kit
    from polyfm.core.trainer import build_trainer

    _quiet_lightning()
    out = Path(output)
    key = run_key(run)
    start = time.time()
    kit = load_kit(run["domain"], Path(run["data_dir"]) if run["data_dir"] else None, quick=run["quick"])
    L.seed_everything(run["seed"], verbose=False)
    encoder = build_encoder(kit, run)
    load_source(encoder, run["source"], out, run)
    task = kit.make_task(encoder, Adaptation(**run["adaptation"]))
    data = kit.make_finetune_data(run["label_fraction"], run["seed"])
    trainer = build_trainer(
        max_epochs=kit.finetune_epochs, default_root_dir=str(out / "runs" / key), enable_progress_bar=False,
        loggers=("csv",), enable_checkpointing=False, enable_model_summary=False,
    )
    task.train()  # see pretrain_domain
    trainer.fit(task, data)
    tested = trainer.test(task, data, verbose=False)[0]
    train_set = getattr(data, "train_set", None)
    n_train = len(train_set) if train_set is not None else None
    return {
        "key": key,
        **{k: v for k, v in run.items() if k not in ("adaptation", "trunk_architecture")},
        "domain": f"{run['domain']}+trunk" if run.get("trunk") else run["domain"],
        "adaptation": Adaptation(**run["adaptation"]).label,
        "trunk": bool(run.get("trunk")),
        "adaptation_config": json.dumps(run["adaptation"], sort_keys=True),
        "target": kit.target,
        "metric_name": kit.metric,
        "higher_is_better": kit.higher_is_better,
        "metric": float(tested[kit.metric]),
        "metrics": json.dumps({k: float(v) for k, v in tested.items()}),
        "n_train": n_train,
        "seconds": time.time() - start,
        "status": "ok",
    }


# ----------------------------------------------------------------------------- runner


class Progress:
    """Runs done/left and time left, printed as lines (logs) and as a Rich bar on a terminal."""

    def __init__(self, total: int, already: int, label: str) -> None:
        self.total, self.done, self.label = total, already, label
        self.started = time.time()
        self.fresh = 0

    def advance(self, row: dict[str, Any]) -> None:
        self.done += 1
        self.fresh += 1
        elapsed = time.time() - self.started
        left = self.total - self.done
        eta = elapsed / self.fresh * left if self.fresh else 0.0
        status = f"{row.get('metric_name', '')}={row.get('metric', float('nan')):.4f}" if row.get("status") == "ok" else f"FAILED: {row.get('error', '')[:120]}"
        print(
            f"[{self.label}] {self.done}/{self.total} runs done, {left} left, elapsed {elapsed / 60:.1f} min, "
            f"about {eta / 60:.1f} min left | {row.get('domain')} {row.get('source')} {row.get('adaptation')} "
            f"frac={row.get('label_fraction')} seed={row.get('seed')} {status}",
            flush=True,
        )


def run_grid(
    runs: list[dict[str, Any]],
    output: Path,
    workers: int = 1,
    ray_address: str | None = None,
    label: str = "study",
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    runs_dir = output / "runs"
    pending = [r for r in runs if not (runs_dir / f"{run_key(r)}.json").exists()]
    progress = Progress(len(runs), len(runs) - len(pending), label)
    if len(pending) < len(runs):
        print(f"[{label}] resuming: {len(runs) - len(pending)} finished run(s) kept, {len(pending)} to go", flush=True)

    def record(run: dict[str, Any], row: dict[str, Any]) -> None:
        failed_file = output / "failed" / f"{run_key(run)}.json"
        if row.get("status") == "ok":
            write_json_atomic(runs_dir / f"{run_key(run)}.json", row)
            failed_file.unlink(missing_ok=True)  # an earlier failure of this run, now retried successfully
        else:
            write_json_atomic(failed_file, row)
        progress.advance(row)
        if on_result:
            on_result(row)

    def failure(run: dict[str, Any], exc: BaseException) -> dict[str, Any]:
        return {**run, "adaptation": json.dumps(run["adaptation"]), "status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}

    if ray_address:
        _run_on_ray(pending, output, ray_address, record, failure)
    elif workers > 1:
        _run_in_processes(pending, output, workers, record, failure)
    else:
        for run in pending:
            try:
                row = execute_run(run, str(output))
            except Exception as exc:  # one failed run is recorded, not fatal to the grid
                row = failure(run, exc)
            record(run, row)
    return collect_rows(output)


def _run_in_processes(pending: list[dict[str, Any]], output: Path, workers: int, record: Any, failure: Any) -> None:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    import torch

    gpus = torch.cuda.device_count()
    context = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_pin_worker_gpu, initargs=(gpus,)) as pool:
        futures = {pool.submit(execute_run, run, str(output)): run for run in pending}
        for future in as_completed(futures):
            run = futures[future]
            try:
                row = future.result()
            except Exception as exc:
                row = failure(run, exc)
            record(run, row)


def _pin_worker_gpu(gpus: int) -> None:
    """One process per GPU: each worker sees one device."""
    if gpus:
        import multiprocessing as mp

        identity = mp.current_process()._identity
        index = (identity[0] - 1) % gpus if identity else 0
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index)


def _run_on_ray(pending: list[dict[str, Any]], output: Path, address: str, record: Any, failure: Any) -> None:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("Running on a Ray cluster needs `pip install polyfm-core[ray]`.") from exc
    ray.init(address=address)
    gpus_per_trial = 1 if ray.cluster_resources().get("GPU", 0) else 0
    remote = ray.remote(num_gpus=gpus_per_trial)(execute_run)
    refs = {remote.remote(run, str(output)): run for run in pending}
    while refs:
        ready, _ = ray.wait(list(refs), num_returns=1)
        run = refs.pop(ready[0])
        try:
            row = ray.get(ready[0])
        except Exception as exc:
            row = failure(run, exc)
        record(run, row)


def collect_rows(output: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted((output / "runs").glob("*.json")):
        try:
            rows.append(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:  # cannot happen with atomic writes; say so loudly if it does
            raise ConfigError(f"Result file {path} is corrupt ({exc}); delete it to rerun that run.") from exc
    return rows


def run_study(config_path: Path | StudyConfig, workers: int = 1, ray_address: str | None = None, output: str | None = None) -> Path:
    config = config_path if isinstance(config_path, StudyConfig) else StudyConfig.load(config_path)
    config.validate(config.name)
    out = Path(output or config.output)
    (out / "study.yaml").parent.mkdir(parents=True, exist_ok=True)
    (out / "study.yaml").write_text(yaml.safe_dump(asdict(config), sort_keys=False))
    runs = config.runs()
    if any(r.get("trunk") for r in runs):
        architecture = trunk_architecture(config.sources)
        print(f"[{config.name}] transformer trunk from {next(s for s in config.sources if ':' in s)}: {architecture}", flush=True)
        for run in runs:
            if run.get("trunk"):
                run["trunk_architecture"] = architecture
    print(f"[{config.name}] {len(runs)} runs: {len(config.targets)} target(s) x {len(config.sources)} source(s) x "
          f"{len(config.adaptations)} adaptation(s) x {len(config.label_fractions)} fraction(s) x {len(config.seeds)} seed(s)", flush=True)
    if "pretrained" in config.sources:
        for target in config.targets:
            if target.get("trunk"):
                continue
            try:
                info = pretrain_domain(out, target["domain"], target.get("data_dir", config.data_dir), config.quick)
                (out / "failed" / f"pretrain-{target['domain']}.json").unlink(missing_ok=True)
            except Exception as exc:  # recorded; that domain's pretrained runs then fail by name, the rest go on
                write_json_atomic(out / "failed" / f"pretrain-{target['domain']}.json", {"domain": target["domain"], "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
                print(f"[{config.name}] PRETRAINING FAILED for {target['domain']}: {type(exc).__name__}: {exc}", flush=True)
                continue
            losses = ", ".join(f"{k.removeprefix('pretrain_').replace('_', ' ')} {v:.4f}" for k, v in info.items() if k.startswith("pretrain_"))
            print(f"[{config.name}] pretrained {target['domain']} in {info['seconds']:.1f} s ({info['epochs']} epochs): {losses}", flush=True)
    rows = run_grid(runs, out, workers=workers, ray_address=ray_address, label=config.name)
    from polyfm.core.report import write_report

    write_report(rows, out, title=config.name)
    failed = sorted((out / "failed").glob("*.json")) if (out / "failed").exists() else []
    if failed:
        print(f"[{config.name}] {len(failed)} failure(s), each with its traceback in {out / 'failed'}: "
              + ", ".join(json.loads(p.read_text()).get("error", "")[:80] for p in failed[:5]), flush=True)
    return out


def study_failures(output: Path) -> list[Path]:
    return sorted((output / "failed").glob("*.json")) if (output / "failed").exists() else []


def iter_domains(targets: Iterable[dict[str, Any]]) -> list[str]:
    return sorted({t["domain"] for t in targets})
