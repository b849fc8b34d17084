"""Shared plotting helpers (matplotlib, Agg backend; files only, never a window).

Each function takes plain tensors / arrays / dicts and writes a PNG (or any format matplotlib knows
from the suffix), returning the path.
"""
import math
import os


def _plt():
    import sys

    import matplotlib
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _np(x):
    import numpy as np
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=float)


def _int_ticks(ax):
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, path):
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _plt().close(fig)
    return path


def layer_curves(curves: dict, path, title="", ylabel="score", xlabel="layer", ylim=None):
    """One line per key of `curves` ({label: per-layer values}) against the layer index."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, ys in curves.items():
        ys = _np(ys)
        ax.plot(range(len(ys)), ys, marker="o", markersize=3, label=str(label))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _int_ticks(ax)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8, ncol=2 if len(curves) > 6 else 1)
    return _save(fig, path)


def mexa_curve(result: dict, path, pooling=None, title=None):
    """MEXA per layer for each language, from the dict `align.mexa` returns (ANC dashed if present)."""
    pooling = pooling or result["poolings"][0]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (lang, ys) in enumerate(result["mexa"][pooling].items()):
        c = colors[i % len(colors)]
        ax.plot(range(len(ys)), ys, marker="o", markersize=3, color=c, label=f"{lang} MEXA")
        if "anc" in result and lang in result["anc"]:
            ax.plot(range(len(ys)), result["anc"][lang], ls="--", color=c, alpha=0.6, label=f"{lang} ANC")
    ax.set_xlabel("layer (0 = embeddings)")
    _int_ticks(ax)
    ax.set_ylabel("alignment with " + result.get("pivot", "pivot"))
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title or f"MEXA per layer ({pooling} pooling, n={result.get('n', '?')})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def head_heatmaps(scores: dict, path, title="", cmap="viridis", shared_scale=True):
    """One layer x head heatmap per language: scores {lang: (L, H)}."""
    plt = _plt()
    if not scores:
        raise ValueError("scores is empty")
    k = len(scores)
    cols = min(k, 4)
    rows = math.ceil(k / cols)
    arrays = {l: _np(v) for l, v in scores.items()}
    for l, a in arrays.items():
        if a.ndim != 2:
            raise ValueError(f"scores[{l!r}] must be (layers, heads), got shape {a.shape}")
    lo = min(a.min() for a in arrays.values()) if shared_scale else None
    hi = max(a.max() for a in arrays.values()) if shared_scale else None
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[k:]:
        ax.axis("off")
    im = None
    for ax, (lang, a) in zip(axes.flat, arrays.items()):
        im = ax.imshow(a, aspect="auto", origin="lower", cmap=cmap, vmin=lo, vmax=hi)
        ax.set_title(str(lang), fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        if not shared_scale:
            fig.colorbar(im, ax=ax, fraction=0.046)
    if shared_scale and im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def neuron_counts(counts: dict, path, title="", kind="bar", ylabel="neurons"):
    """Per-layer neuron counts per language: counts {lang: (L,) ints}; kind "bar" (grouped) or "line"."""
    if kind not in ("bar", "line"):
        raise ValueError(f"kind must be 'bar' or 'line', got {kind!r}")
    if kind == "line":
        return layer_curves(counts, path, title=title, ylabel=ylabel)
    plt = _plt()
    arrays = {l: _np(v) for l, v in counts.items()}
    L = max(len(a) for a in arrays.values())
    k = len(arrays)
    width = 0.8 / max(k, 1)
    fig, ax = plt.subplots(figsize=(max(7, L * 0.45), 4))
    for i, (lang, a) in enumerate(arrays.items()):
        ax.bar([x + (i - (k - 1) / 2) * width for x in range(len(a))], a, width=width, label=str(lang))
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(L))
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    if k > 1:
        ax.legend(fontsize=8, ncol=2 if k > 6 else 1)
    return _save(fig, path)
