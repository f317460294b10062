"""PNG plots people look at: anomaly-map overlays and score histograms per category."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def score_histograms(path: Path, categories: list[str], scores: np.ndarray, labels: np.ndarray,
                     thresholds: dict[str, float | None]) -> Path:
    """One panel per category: normal vs anomalous image scores and the calibrated threshold."""
    cats = sorted(set(categories))
    fig, axes = plt.subplots(1, len(cats), figsize=(4 * len(cats), 3), squeeze=False)
    cats_arr = np.asarray(categories)
    for ax, cat in zip(axes[0], cats, strict=True):
        s, y = scores[cats_arr == cat], labels[cats_arr == cat]
        bins = np.linspace(s.min(), s.max(), 30) if s.max() > s.min() else 10
        ax.hist(s[y == 0], bins=bins, alpha=0.6, label="normal", color="tab:green")
        ax.hist(s[y == 1], bins=bins, alpha=0.6, label="anomalous", color="tab:red")
        if thresholds.get(cat) is not None:
            ax.axvline(thresholds[cat], color="k", ls="--", label="threshold")
        ax.set_title(cat)
        ax.set_xlabel("image anomaly score")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def overlays(path: Path, images: list[np.ndarray], maps: np.ndarray, titles: list[str],
             masks: list[np.ndarray | None] | None = None, vmax: float | None = None) -> Path:
    """A grid: each image with its anomaly map overlaid (and the ground-truth outline if known)."""
    n = len(images)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    vmax = vmax if vmax is not None else float(np.max(maps)) if n else 1.0
    for ax in axes.ravel():
        ax.axis("off")
    for i, ax in enumerate(axes.ravel()[:n]):
        ax.imshow(images[i])
        ax.imshow(maps[i], cmap="jet", alpha=0.45, vmin=float(np.min(maps)), vmax=vmax)
        if masks is not None and masks[i] is not None and masks[i].any():
            ax.contour(masks[i], levels=[0.5], colors="white", linewidths=0.8)
        ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def learning_curve(path: Path, rounds: list[dict]) -> Path:
    """Per policy: anomalies found and image AUROC on the held-out split against labels shown (and,
    with ``--parity``, the AUROC of a model fitted from scratch on the same labels, dashed)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for policy in sorted({r["policy"] for r in rounds}):
        rows = sorted((r for r in rounds if r["policy"] == policy), key=lambda r: r["round"])
        shown = np.cumsum([r["shown"] for r in rows])
        found = np.cumsum([r["anomalies_found"] for r in rows])
        ax1.plot(shown, found, marker="o", label=policy)
        line, = ax2.plot(shown, [r["image_auroc"] for r in rows], marker="o", label=policy)
        if all("batch_image_auroc" in r for r in rows):  # --parity: a model fitted from scratch on the same labels
            ax2.plot(shown, [r["batch_image_auroc"] for r in rows], marker="x", linestyle="--", color=line.get_color(),
                     label=f"{policy}: from scratch")
    ax1.set(xlabel="images shown to the annotator", ylabel="anomalies found", title="Finding defects")
    ax2.set(xlabel="images shown to the annotator", ylabel="image AUROC (held-out)", title="Model quality")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
