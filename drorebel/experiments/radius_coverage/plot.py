"""Plot of the radius–coverage study: log–log error against n per divergence, and coverage."""

from __future__ import annotations

from pathlib import Path

from drorebel.experiments._common import pyplot

__all__ = ["plot_results"]

_STYLE = {
    "erm": ("k", "o"),
    "d_over_n": ("tab:blue", "s"),
    "sqrt_d_over_n": ("tab:orange", "^"),
    "fixed": ("tab:red", "v"),
}


def plot_results(results: dict[str, dict[str, dict]], path: str | Path, title: str = "") -> Path:
    """Save a PNG: one panel per divergence (mean ‖θ̂ − θ*‖ vs n, log–log, fitted slope in the
    legend, dotted n^(-1/2) and n^(-1/4) guides) and one panel of coverage vs n."""
    plt = pyplot()
    divergences = list(results)
    fig, axes = plt.subplots(1, len(divergences) + 1, figsize=(4.2 * (len(divergences) + 1), 3.8))
    for ax, div in zip(axes, divergences):
        for sched, entry in results[div].items():
            color, marker = _STYLE.get(sched, ("gray", "."))
            label = f"{sched} (slope {entry['slope']:+.2f})"
            ax.loglog(entry["n"], entry["errors"], marker=marker, color=color, label=label)
        _guides(ax, results[div])
        ax.set_title(div)
        ax.set_xlabel("n (pairs)")
        ax.set_ylabel("mean ‖θ̂ − θ*‖")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    ax = axes[-1]
    for div, ls in zip(divergences, ("-", "--", ":")):
        for sched, entry in results[div].items():
            color, marker = _STYLE.get(sched, ("gray", "."))
            ax.semilogx(
                entry["n"],
                entry["coverage_by_n"],
                ls=ls,
                marker=marker,
                color=color,
                label=f"{div}/{sched}",
                ms=3,
            )
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("coverage: P(R_n(θ*) ≥ L(θ*))")
    ax.set_xlabel("n (pairs)")
    ax.legend(fontsize=5, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _guides(ax, entries: dict[str, dict]) -> None:
    """Dotted reference lines ∝ n^(-1/2) and n^(-1/4) through the ERM curve's first point."""
    first = entries.get("erm") or next(iter(entries.values()))
    n0, e0 = first["n"][0], first["errors"][0]
    n1 = first["n"][-1]
    for power in (0.5, 0.25):
        ax.loglog([n0, n1], [e0, e0 * (n1 / n0) ** -power], "k:", lw=0.8, alpha=0.6)
