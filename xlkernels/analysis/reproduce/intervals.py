"""95% intervals and the verdict rule every row uses.

A claim holds when the interval's lower bound clears the criterion, does not hold when its upper bound is
below it (the data decide against it), and is undecided otherwise, with the sample size that would likely
decide it. Bootstrap: percentile intervals over resampled items (texts, prompts, pairs), seeded.
"""
from __future__ import annotations

import math

import torch

Z95 = 1.959963984540054
N_BOOT = 2000


def wilson(k: int, n: int, z: float = Z95):
    """Wilson score interval (lo, hi) of a rate k / n; (0, 1) when n = 0."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def bootstrap(stat, n: int, n_boot: int = N_BOOT, seed: int = 0, groups=None, clusters=None):
    """Percentile 95% interval of stat(idx) over resamples of range(n) with replacement.

    stat(idx) -> float, idx a LongTensor of item ids. groups: optional (n,) ids; then resampling is done
    within each group (e.g. per language), keeping group sizes. clusters: optional (n,) ids of items that are
    not independent (one paragraph in several languages); then whole clusters are resampled. Returns
    (estimate, lo, hi)."""
    if n < 1:
        raise ValueError("bootstrap needs at least one item")
    if groups is not None and clusters is not None:
        raise ValueError("bootstrap takes groups or clusters, not both")
    g = torch.Generator().manual_seed(seed)
    est = float(stat(torch.arange(n)))
    if groups is None:
        parts = [torch.arange(n)]
    else:
        groups = torch.as_tensor(groups)
        parts = [(groups == v).nonzero().flatten() for v in groups.unique()]
    if clusters is not None:
        clusters = torch.as_tensor(clusters)
        if clusters.shape != (n,):
            raise ValueError(f"clusters must have shape ({n},), got {tuple(clusters.shape)}")
        members = [(clusters == v).nonzero().flatten() for v in clusters.unique()]
    vals = []
    for _ in range(n_boot):
        if clusters is not None:
            idx = torch.cat([members[j] for j in torch.randint(len(members), (len(members),), generator=g)])
        else:
            idx = torch.cat([p[torch.randint(len(p), (len(p),), generator=g)] for p in parts])
        vals.append(float(stat(idx)))
    v = torch.tensor(vals, dtype=torch.float64)
    lo, hi = torch.quantile(v, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return est, lo, hi


def parallel_clusters(n_langs: int, m: int) -> torch.Tensor:
    """Cluster ids of items pooled language by language, item i of each language from paragraph i."""
    return torch.arange(m).repeat(n_langs)


def mean_ci(x, n_boot: int = N_BOOT, seed: int = 0):
    """(mean, lo, hi) of the values x by bootstrap."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    return bootstrap(lambda i: x[i].mean(), len(x), n_boot, seed)


def fisher_ci(r: float, n: int, z: float = Z95):
    """95% interval of a Pearson correlation r over n points (Fisher z); (-1, 1) for n <= 3."""
    if n <= 3:
        return -1.0, 1.0
    r = max(-0.999999, min(0.999999, r))
    f, s = math.atanh(r), 1 / math.sqrt(n - 3)
    return math.tanh(f - z * s), math.tanh(f + z * s)


def pearson(x, y) -> float:
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    d = float(x.norm() * y.norm())
    return float((x * y).sum()) / d if d > 0 else 0.0


def verdict(est: float, lo: float, hi: float, criterion: float, n: int):
    """(holds, note): True when lo > criterion, False when hi < criterion, else None with the number of
    items that would likely decide it (the interval's half-width shrinks as 1/sqrt(n))."""
    if lo > criterion:
        return True, ""
    if hi < criterion:
        return False, ""
    half = max((hi - lo) / 2, 1e-12)
    gap = abs(est - criterion)
    if gap < 1e-12 or n <= 0:
        return None, "the estimate sits on the criterion: more items will not decide it quickly"
    need = math.ceil(n * (half / gap) ** 2)
    return None, f"needs about {need} items (has {n}) for the interval to clear the criterion"
