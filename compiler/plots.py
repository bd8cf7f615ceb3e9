"""The report's PNG plots (matplotlib, Agg). The numbers come from ``passes.analysis``; this module only draws."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from passes.analysis import StatsHistory, channel_absmax, group_absmax, outlier_ratio

MAX_CHANNEL_PANELS = 4


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def channel_panels(history: StatsHistory, limit: int = MAX_CHANNEL_PANELS) -> list[tuple[str, dict]]:
    """The sites whose inputs the folds changed, worst outliers (max/median channel range, before) first."""
    panels = [(site, data) for site in _sites(history) if (data := channel_absmax(history, site)) is not None
              and not torch.allclose(data["before"], data["after"], rtol=1e-4)]  # an unfolded site: nothing to compare
    panels.sort(key=lambda p: -outlier_ratio({"min": -p[1]["before"], "max": p[1]["before"]}))
    return panels[:limit]


def _sites(history: StatsHistory) -> list[str]:
    seen: dict[str, None] = {}
    for _, snap in history.snapshots:
        seen.update(dict.fromkeys(snap))
    return list(seen)


def _pass_name(label: str) -> str:
    return label.split(":", 1)[1]


def plot_channel_ranges(history: StatsHistory, path: Path) -> bool:
    panels = channel_panels(history)
    if not panels:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.6 * len(panels) + 0.8), squeeze=False)
    for ax, (site, d) in zip(axes[:, 0], panels):
        # Divided by each curve's median: a fold also rescales every channel (into the weights), and
        # only the spread between channels matters for one shared grid.
        before, after = (v / v.median().clamp(min=1e-12) for v in (d["before"], d["after"]))
        ax.plot(before.numpy(), color="tab:red", lw=1.0,
                label=f"before folding (first '{_pass_name(d['before_label'])}'): max/median {float(before.max()):.1f}x")
        ax.plot(after.numpy(), color="tab:blue", lw=1.0,
                label=f"after folding (last '{_pass_name(d['after_label'])}'): max/median {float(after.max()):.1f}x")
        ax.axhline(1.0, color="gray", lw=0.6, ls=":")
        ax.set_yscale("log")
        ax.set_xlim(0, len(before) - 1)
        ax.set_title(f"{site}  input", fontsize=10, loc="left")
        ax.set_ylabel("max |x| / median")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    axes[-1, 0].set_xlabel("input channel")
    fig.suptitle("Per-channel input range ÷ its median channel, before vs after the folding passes\n"
                 "(log scale; flatter is easier to quantize with one scale; sites with the worst outliers first)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_group_ranges(history: StatsHistory, path: Path) -> bool:
    data = group_absmax(history)
    if not data:
        return False
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    sites = list(data)
    groups = max(len(v) for v in data.values())
    grid = torch.full((len(sites), groups), math.nan)
    for i, s in enumerate(sites):
        grid[i, : len(data[s])] = data[s]
    finite = grid[grid.isfinite() & (grid > 0)]
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * groups + 2.5, 1.2 + 0.32 * len(sites)))
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis",
                   norm=LogNorm(vmin=float(finite.min()), vmax=float(finite.max())))
    ax.set_yticks(range(len(sites)), sites, fontsize=8)
    ax.set_xticks(range(groups), [str(g) for g in range(groups)])
    ax.set_xlabel("token group (VAR: scale index; 2-group sites: class token | rest)")
    if len(sites) * groups <= 600:
        for i in range(len(sites)):
            for j in range(groups):
                if math.isfinite(float(grid[i, j])):
                    bright = im.norm(float(grid[i, j])) > 0.6  # viridis turns yellow: dark text there
                    ax.text(j, i, f"{float(grid[i, j]):.2g}", ha="center", va="center", fontsize=6,
                            color="black" if bright else "white")
    fig.colorbar(im, ax=ax, label="max |x| over channels (log)")
    ax.set_title("Input range per token group (last calibration; blank: the site has fewer groups)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_site_sqnr(site_sqnr: dict[str, float], kinds: dict[str, str], path: Path) -> bool:
    if not site_sqnr:
        return False
    plt = _pyplot()
    sites = list(site_sqnr)  # graph order, first at the top
    values = [min(site_sqnr[s], 200.0) for s in sites]  # inf (no error) drawn at the axis end
    colors = ["tab:orange" if kinds.get(s) == "matmul" else "tab:blue" for s in sites]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.28 * len(sites)))
    ax.barh(range(len(sites)), values, color=colors)
    ax.set_yticks(range(len(sites)), sites, fontsize=8)
    ax.invert_yaxis()
    worst = min(range(len(sites)), key=lambda i: values[i])
    ax.barh([worst], [values[worst]], color="tab:red")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.1f}", va="center", fontsize=7)
    ax.set_xlim(0, max(values) * 1.12)
    ax.set_xlabel("SQNR vs FP of the step's outputs (worst output) with only this site quantized\n"
                  "(dB; higher is better; red: worst site)")
    legend = "blue: linear, orange: attention matmul" if "tab:orange" in colors else "all sites are linears"
    ax.set_title(f"Per-site sensitivity ({legend})", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(out: Path, history: StatsHistory, site_sqnr: dict[str, float], kinds: dict[str, str]) -> dict[str, str]:
    """Draw what there is data for into ``out``; returns {title: file name} for report.md."""
    made = {}
    for title, name, draw in (
        ("Per-channel activation ranges before/after folding", "channel_ranges.png",
         lambda p: plot_channel_ranges(history, p)),
        ("Per-token-group input ranges", "group_ranges.png", lambda p: plot_group_ranges(history, p)),
        ("Per-site SQNR", "site_sqnr.png", lambda p: plot_site_sqnr(site_sqnr, kinds, p)),
    ):
        if draw(out / name):
            made[title] = name
    return made
