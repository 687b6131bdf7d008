"""The study report: a tidy table, a Markdown summary and two kinds of plot.

* ``results.csv`` / ``results.parquet``: one row per run, its configuration and metrics;
* ``summary.md``: mean ± std over seeds, gain over scratch, best adaptation per target;
* ``label_efficiency_<target>.png``: metric vs label fraction, a line per source/adaptation;
* ``transfer_heatmap.png``: source x target gain over scratch in % of scratch's metric (mean
  over fractions and adaptations of the seed means; sign-corrected so that positive is better).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from polyfm.core.files import atomic_path

GROUP = ["domain", "target", "metric_name", "source", "adaptation", "label_fraction"]


def _atomic(path: Path, write: Any) -> None:
    with atomic_path(path) as temporary:
        write(temporary)


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    stats = frame.groupby(GROUP, dropna=False)["metric"].agg(["mean", "std", "count"]).reset_index()
    scratch = stats[stats["source"] == "scratch"][["domain", "adaptation", "label_fraction", "mean"]].rename(columns={"mean": "scratch_mean"})
    stats = stats.merge(scratch, on=["domain", "adaptation", "label_fraction"], how="left")
    better = frame.groupby("domain")["higher_is_better"].first()
    sign = stats["domain"].map(lambda d: 1.0 if better.get(d, True) else -1.0)
    stats["gain_over_scratch"] = sign * (stats["mean"] - stats["scratch_mean"])
    # relative to scratch, so targets with different metrics (accuracy, RMSE, Dice) share one colour scale
    stats["relative_gain_pct"] = 100 * stats["gain_over_scratch"] / stats["scratch_mean"].abs()
    return stats


def write_report(rows: list[dict[str, Any]], output: Path, title: str = "study") -> dict[str, Path]:
    output.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    paths = {"csv": output / "results.csv", "parquet": output / "results.parquet", "summary": output / "summary.md"}
    if frame.empty:
        paths["summary"].write_text(f"# {title}\n\nNo finished runs yet.\n")
        return paths
    frame = frame.sort_values(["domain", "source", "adaptation", "label_fraction", "seed"]).reset_index(drop=True)
    _atomic(paths["csv"], lambda p: frame.to_csv(p, index=False))
    _atomic(paths["parquet"], lambda p: frame.to_parquet(p, index=False))
    stats = summarise(frame)
    paths.update(plot_label_efficiency(frame, output))
    heatmap = plot_transfer_heatmap(stats, output)
    if heatmap:
        paths["heatmap"] = heatmap
    _atomic(paths["summary"], lambda p: p.write_text(summary_markdown(frame, stats, title, paths, output)))
    return paths


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.4f}" if pd.isna(std) else f"{mean:.4f} ± {std:.4f}"


def summary_markdown(frame: pd.DataFrame, stats: pd.DataFrame, title: str, paths: dict[str, Path], output: Path) -> str:
    lines = [f"# {title}", ""]
    lines.append(f"{len(frame)} runs, {frame['domain'].nunique()} target(s), seeds {sorted(frame['seed'].unique().tolist())}; "
                 f"total training time {frame['seconds'].sum() / 60:.1f} min.")
    lines.append("Metric per target is its test metric (higher is better unless noted); ± is the std over seeds.")
    lines.append("")
    for domain, block in stats.groupby("domain"):
        target, metric = block["target"].iloc[0], block["metric_name"].iloc[0]
        higher = bool(frame[frame["domain"] == domain]["higher_is_better"].iloc[0])
        lines += [f"## {domain}: {target} ({metric}, {'higher' if higher else 'lower'} is better)", ""]
        lines += ["| source | adaptation | label fraction | metric (mean ± std) | runs | gain over scratch |", "|---|---|---|---|---|---|"]
        for _, row in block.sort_values(["label_fraction", "adaptation", "source"]).iterrows():
            gain = "" if pd.isna(row["gain_over_scratch"]) or row["source"] == "scratch" else f"{row['gain_over_scratch']:+.4f}"
            lines.append(f"| {row['source']} | {row['adaptation']} | {row['label_fraction']:g} | {_fmt(row['mean'], row['std'])} | {int(row['count'])} | {gain} |")
        ordered = block.sort_values("mean", ascending=not higher)
        best = ordered.iloc[0]
        lines += ["", f"Best: **{best['source']} / {best['adaptation']}** at fraction {best['label_fraction']:g} ({best['mean']:.4f})."]
        per_adaptation = block[block["source"] != "scratch"].groupby("adaptation")["gain_over_scratch"].mean().dropna()
        if not per_adaptation.empty:
            lines.append(f"Best adaptation by mean gain over scratch: **{per_adaptation.idxmax()}** ({per_adaptation.max():+.4f}).")
        plot = paths.get(f"curve_{domain}")
        if plot:
            lines += ["", f"![label efficiency {domain}]({plot.relative_to(output)})"]
        lines.append("")
    if "heatmap" in paths:
        lines += ["## Transfer heatmap", "", f"![source x target gain over scratch]({paths['heatmap'].relative_to(output)})", ""]
    return "\n".join(lines)


def plot_label_efficiency(frame: pd.DataFrame, output: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = {}
    for domain, block in frame.groupby("domain"):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for (source, adaptation), line in block.groupby(["source", "adaptation"]):
            stats = line.groupby("label_fraction")["metric"].agg(["mean", "std"]).reset_index()
            ax.errorbar(stats["label_fraction"], stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3, label=f"{source} / {adaptation}")
        ax.set_xscale("log")
        fractions = sorted(block["label_fraction"].unique())
        ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
        ax.minorticks_off()
        ax.set_xlabel("label fraction of the training split")
        ax.set_ylabel(block["metric_name"].iloc[0])
        ax.set_title(f"{domain}: {block['target'].iloc[0]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = output / f"label_efficiency_{domain}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made[f"curve_{domain}"] = path
    return made


def plot_transfer_heatmap(stats: pd.DataFrame, output: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    gains = stats[stats["source"] != "scratch"].pivot_table(index="source", columns="domain", values="relative_gain_pct", aggfunc="mean")
    if gains.empty:
        return None
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * gains.shape[1], 1.4 + 0.6 * gains.shape[0]))
    limit = float(np.nanmax(np.abs(gains.values))) or 1.0
    image = ax.imshow(gains.values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(gains.shape[1]), gains.columns, rotation=30, ha="right")
    ax.set_yticks(range(gains.shape[0]), gains.index)
    for i in range(gains.shape[0]):
        for j in range(gains.shape[1]):
            value = gains.values[i, j]
            if not np.isnan(value):
                colour = "white" if abs(value) > 0.6 * limit else "black"
                ax.text(j, i, f"{value:+.1f}%", ha="center", va="center", fontsize=8, color=colour)
    fig.colorbar(image, ax=ax, label="% vs scratch")
    ax.set_title("source x target: relative gain over scratch")
    fig.tight_layout()
    path = output / "transfer_heatmap.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
