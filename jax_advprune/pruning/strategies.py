"""Selection strategies: (scores, labels, which samples may be pruned) -> keep mask and eps.

All arrays are indexed by global pool position. Samples outside `prunable` are
always kept. Ties between equal scores are broken at random (from the seed), so
no strategy silently prefers the front of a class-sorted file.
"""

from __future__ import annotations

import numpy as np

STRATEGIES = ("random", "prune_easy", "prune_hard", "puma", "keep_top", "keep_bottom")
PUMA_RULES = ("below_eps", "low_fraction")


def _keep_count(n: int, keep_ratio: float) -> int:
    return int(round(keep_ratio * n))


def keep_by_score(
    scores: np.ndarray,
    prunable: np.ndarray,
    keep_ratio: float,
    *,
    keep: str,
    labels: np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Keeps round(keep_ratio * n) prunable samples with the lowest or highest score.

    scores (N,) float, prunable (N,) bool, keep in {'lowest', 'highest'}. With
    `labels` (N,) the count is taken per class (class-balanced). Returns keep (N,) bool.
    """
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}")
    if keep not in ("lowest", "highest"):
        raise ValueError(f"keep must be 'lowest' or 'highest', got {keep!r}")
    rng = np.random.default_rng(seed)
    result = ~np.asarray(prunable, bool)
    groups = [np.flatnonzero(prunable)]
    if labels is not None:
        groups = [g for c in np.unique(labels[prunable]) for g in [np.flatnonzero(prunable & (labels == c))]]
    for members in groups:
        shuffled = members[rng.permutation(len(members))]  # random tie-breaking
        order = np.argsort(scores[shuffled], kind="stable")
        if keep == "highest":
            order = order[::-1]
        result[shuffled[order[: _keep_count(len(members), keep_ratio)]]] = True
    return result


def puma_eps(
    margins: np.ndarray,
    keep: np.ndarray,
    base_eps: float,
    *,
    rule: str = "below_eps",
    scale: float = 1.0,
    eps_min: float = 0.0,
    low_fraction: float = 0.1,
) -> np.ndarray:
    """PUMA's per-sample training eps (our reading of the paper; see ALGORITHMS.md).

    For the kept samples chosen by `rule` -- 'below_eps': margin < base_eps;
    'low_fraction': the `low_fraction` of kept samples with the lowest margin --
    eps_i = clip(scale * margin_i, eps_min, base_eps). Every other sample keeps
    base_eps. Misclassified samples (margin <= 0) get eps_min.
    Returns eps (N,) float32, never above base_eps.
    """
    if rule not in PUMA_RULES:
        raise ValueError(f"puma rule must be one of {PUMA_RULES}, got {rule!r}")
    if not 0.0 <= eps_min <= base_eps:
        raise ValueError(f"puma eps_min must be in [0, eps={base_eps}], got {eps_min}")
    eps = np.full(len(margins), base_eps, np.float32)
    if rule == "below_eps":
        lowered = keep & (margins < base_eps)
    else:
        kept = np.flatnonzero(keep)
        lowest = kept[np.argsort(margins[kept], kind="stable")[: int(round(low_fraction * len(kept)))]]
        lowered = np.zeros(len(margins), bool)
        lowered[lowest] = True
    eps[lowered] = np.clip(scale * margins[lowered], eps_min, base_eps)
    return eps


def select(
    strategy: str,
    *,
    scores: np.ndarray | None,
    labels: np.ndarray,
    prunable: np.ndarray,
    keep_ratio: float,
    base_eps: float,
    class_balanced: bool = False,
    seed: int = 0,
    puma: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Applies a named strategy -> (keep (N,) bool, eps (N,) float32).

    random: a uniform random subset. prune_easy: drop the highest scores (margins).
    prune_hard: drop the lowest. puma: prune_easy plus `puma_eps` on the kept samples,
    with `puma` holding puma_eps's keyword options. keep_top / keep_bottom: keep the
    highest / lowest scores of any score (keep_top of DU is the extrapolation
    paper's rule; keep_bottom of a margin is prune_easy).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown pruning strategy {strategy!r}; choose one of {STRATEGIES}")
    n = len(labels)
    group_labels = labels if class_balanced else None
    if strategy == "random":
        random_scores = np.random.default_rng([seed, 1]).random(n)
        keep = keep_by_score(random_scores, prunable, keep_ratio, keep="lowest", labels=group_labels, seed=seed)
        return keep, np.full(n, base_eps, np.float32)
    if scores is None or len(scores) != n:
        raise ValueError(f"strategy {strategy!r} needs one score per pool sample ({n}), got {None if scores is None else len(scores)}")
    keep_side = "highest" if strategy in ("prune_hard", "keep_top") else "lowest"
    keep = keep_by_score(scores, prunable, keep_ratio, keep=keep_side, labels=group_labels, seed=seed)
    if strategy == "puma":
        return keep, puma_eps(scores, keep, base_eps, **(puma or {}))
    return keep, np.full(n, base_eps, np.float32)
