"""Plots of the preference-shift experiments: reward per mixture (seed bands), training curves,
REBEL's frontier with the methods on it."""

from __future__ import annotations

from pathlib import Path

from drorebel.experiments._common import pyplot

__all__ = ["plot_curves", "plot_frontier", "plot_mixtures", "plot_real_mixtures"]

_COLORS = ["k", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]


def _band(ax, x, stats, color, label, marker="o", ls="-", floor=None):
    mean = [s["mean"] for s in stats]
    std = [s["std"] for s in stats]
    ax.plot(x, mean, marker=marker, ms=3, color=color, label=label, ls=ls)
    low = [m - s if floor is None else max(m - s, floor * m) for m, s in zip(mean, std)]
    ax.fill_between(x, low, [m + s for m, s in zip(mean, std)], color=color, alpha=0.15, lw=0)


def _save(plt, fig, path: str | Path, n_seeds: int | None = None) -> Path:
    """Title with the seed count (when given), tight layout, PNG at 120 dpi; closes ``fig``."""
    if n_seeds is not None:
        fig.suptitle(f"preference shift: {n_seeds} seeds, band = ±1 std", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _curve_stats(runs: list[dict], key: str) -> list[dict[str, float]]:
    """Mean ± std over runs per iteration of curve ``key``; None entries (no step taken: DPO on
    a batch of ties only) are left out, NaN where no run has a value."""
    import numpy as np

    vals = np.array([[np.nan if x is None else x for x in run[key]] for run in runs])
    seen = (~np.isnan(vals)).sum(0)
    filled = np.where(np.isnan(vals), 0.0, vals)
    mean = np.where(seen > 0, filled.sum(0) / np.maximum(seen, 1), np.nan)
    var = ((filled - mean) ** 2 * ~np.isnan(vals)).sum(0) / np.maximum(seen - 1, 1)
    return [{"mean": m, "std": s} for m, s in zip(mean, np.sqrt(var))]


def plot_mixtures(results: dict, path: str | Path) -> Path:
    """Left: mean reward at ``w = (α, 1 − α, 0)`` against α (training α marked); right: the
    mixtures with the unseen objective. Mean over seeds, band = ± 1 std."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    methods = results["methods"]
    alphas = results["mixtures"]["seen_alphas"]
    unseen_labels = list(next(iter(methods.values()))["per_mixture"]["unseen"])
    for k, (name, s) in enumerate(methods.items()):
        color = _COLORS[k % len(_COLORS)]
        _band(ax1, alphas, list(s["per_mixture"]["seen"].values()), color, name)
        _band(ax2, range(len(unseen_labels)), list(s["per_mixture"]["unseen"].values()), color,
              name)
    base = results["base"]["per_mixture"]
    _band(ax1, alphas, list(base["seen"].values()), "gray", "base (no training)", ls="--")
    _band(ax2, range(len(unseen_labels)), list(base["unseen"].values()), "gray",
          "base (no training)", ls="--")
    alpha_train = results["config"]["alpha"]
    ax1.axvline(alpha_train, color="gray", ls=":", label=f"training α = {alpha_train}")
    ax1.set_xlabel("α  (reward = α·joy + (1 − α)·formal)")
    ax1.set_ylabel("mean reward of samples")
    ax1.set_title("shifted mixtures of the two seen objectives")
    ax1.legend(fontsize=7)
    ax2.set_xticks(range(len(unseen_labels)))
    ax2.set_xticklabels([lab.replace(",", "\n") for lab in unseen_labels], fontsize=7)
    ax2.set_xlabel("(1 − β)·(α·joy + (1 − α)·formal) + β·calm")
    ax2.set_title("unseen objective (calm) mixed in")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
    return _save(plt, fig, path, len(results["seeds"]))


def plot_curves(results: dict, path: str | Path) -> Path:
    """Training-mixture reward of the on-policy samples and the loss per iteration (mean over
    seeds, band = ± 1 std)."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for k, (name, runs) in enumerate(results["curves"].items()):
        color = _COLORS[k % len(_COLORS)]
        for ax, key in ((ax1, "train_reward"), (ax2, "loss")):
            stats = _curve_stats(runs, key)
            _band(ax, range(1, len(stats) + 1), stats, color, name, marker="",
                  floor=0.1 if key == "loss" else None)
    ax1.set_title("training-mixture reward of the sampled pairs")
    ax2.set_title("training loss (each method's own objective)")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
    ax1.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_real_mixtures(results: dict, path: str | Path) -> Path:
    """Left: mean reward at the seen mixtures ``a·e_s0 + (1 − a)·e_s1`` against ``a`` (training
    mixture marked); right: the mixtures with an unseen objective. Band: ± 1 std over seeds."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [2, 3]})
    alphas = results["mixtures"]["seen_alphas"]
    labels = list(results["mixtures"]["unseen"])
    rows = list(results["methods"].items()) + [("base (no training)", results["base"])]
    for k, (name, s) in enumerate(rows):
        color, ls = ("gray", "--") if k == len(rows) - 1 else (_COLORS[k % len(_COLORS)], "-")
        _band(ax1, alphas, list(s["per_mixture"]["seen"].values()), color, name, ls=ls)
        _band(ax2, range(len(labels)), list(s["per_mixture"]["unseen"].values()), color, name,
              ls=ls if ls == "--" else ":")  # categories: the dotted line only guides the eye
    names = results["objectives"]
    s0, s1 = results["seen"]
    w = results["alpha_train"]
    ax1.axvline(w[s0] / (w[s0] + w[s1]), color="gray", ls=":", label="training mixture")
    ax1.set_xlabel(f"a  (reward = a·{names[s0]} + (1 − a)·{names[s1]})")
    ax1.set_ylabel("mean reward of samples")
    ax1.set_title("shifted mixtures of the seen objectives")
    ax1.legend(fontsize=7)
    step = max(1, len(labels) // 24)
    ax2.set_xticks(range(0, len(labels), step))
    ax2.set_xticklabels(labels[::step], fontsize=6, rotation=60, ha="right")
    ax2.set_title("(1 − b)·seen mixture + b·unseen objective")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
    return _save(plt, fig, path, len(results["seeds"]))


def _mean_se(values) -> tuple[float, float]:
    import numpy as np

    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def _frontier_axes(ax, results: dict, legend: bool) -> None:
    import numpy as np

    fr = results["frontier"]
    per_seed = np.asarray(fr["per_seed"], dtype=float)  # seeds × budgets × (x, y)
    for curve in per_seed:
        order = np.argsort(curve[:, 0], kind="stable")
        ax.plot(curve[order, 0], curve[order, 1], color="k", alpha=0.15, lw=0.8)
    mean = per_seed.mean(0)
    ax.plot(mean[:, 0], mean[:, 1], "k-o", ms=3,
            label=f"{fr['reference']} stopped earlier (mean over seeds, by budget)")
    for (x, y), it in zip(mean, fr["iterations"]):
        ax.annotate(str(it), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for k, (name, s) in enumerate(results["methods"].items()):
        gap = s.get("frontier_gap")
        if gap is None:
            continue
        pts = np.asarray(gap["points"], dtype=float)
        (mx_, sx), (my, sy) = _mean_se(pts[:, 0]), _mean_se(pts[:, 1])
        ax.errorbar(mx_, my, xerr=sx, yerr=sy, fmt="s", ms=5, capsize=2,
                    color=_COLORS[(k % (len(_COLORS) - 1)) + 1],
                    label=f"{name}: gap {gap['mean']:+.3f} ± {gap['se']:.3f}")
    ax.set_xlabel("reward at the training mixture")
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend(fontsize=7)


def plot_frontier(results: dict, path: str | Path) -> Path:
    """Worst case over all mixtures against the training-mixture reward: REBEL's frontier per
    seed (faint, the points sorted by training reward as the gap uses them) and its mean over
    seeds by training budget (labelled with iterations), and every method's mean point with
    ± 1 standard-error bars in both directions. Right: the same, zoomed on REBEL's points."""
    import numpy as np

    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    _frontier_axes(ax1, results, legend=True)
    _frontier_axes(ax2, results, legend=False)
    pts = np.asarray(results["frontier"]["per_seed"], dtype=float).reshape(-1, 2)
    lo, hi = pts.min(0), pts.max(0)
    pad = np.maximum((hi - lo) * 0.15, 1e-3)
    ax2.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
    ax2.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
    ax1.set_ylabel({"worst_group": "worst group's reward"}.get(results.get("primary"),
                                                               "worst case over all mixtures"))
    ax1.set_title("all methods")
    ax2.set_title("zoom on REBEL's points")
    fig.suptitle(f"REBEL's trade-off frontier, {len(results['seeds'])} seeds; methods: "
                 "mean ± 1 s.e.; gap = paired distance above the frontier", fontsize=10)
    return _save(plt, fig, path)
