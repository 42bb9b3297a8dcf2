"""Selection strategies: (scores, labels, which samples may be pruned) -> keep mask and eps.

All arrays are indexed by global pool position. Samples outside `prunable` are
always kept. Ties between equal scores are broken at random (from the seed), so
no strategy silently prefers the front of a class-sorted file.
"""

from __future__ import annotations

import numpy as np

STRATEGIES = ("random", "prune_easy", "prune_hard", "puma", "keep_top", "keep_bottom")
PUMA_RULES = ("below_eps", "low_fraction")
# What PUMA does with a kept sample the margin model misclassifies (margin <= 0): train it with eps_min,
# with eps 0 (clean), or drop it from the selection. Our reading; the paper does not say.
PUMA_MISCLASSIFIED = ("eps_min", "eps_zero", "drop")


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
    misclassified: str = "eps_min",
) -> np.ndarray:
    """PUMA's per-sample training eps (our reading of the paper; docs/algorithms.md).

    For the kept samples chosen by `rule` -- 'below_eps': margin < base_eps;
    'low_fraction': the `low_fraction` of kept samples with the lowest margin --
    eps_i = clip(scale * margin_i, eps_min, base_eps). Every other sample keeps
    base_eps. Kept misclassified samples (margin <= 0), whatever the rule, get
    eps_min (`misclassified='eps_min'`) or 0 ('eps_zero'); with 'drop' they
    are removed by `puma_drop`, and their eps here is eps_min.
    Returns eps (N,) float32, never above base_eps.
    """
    if rule not in PUMA_RULES:
        raise ValueError(f"puma rule must be one of {PUMA_RULES}, got {rule!r}")
    if misclassified not in PUMA_MISCLASSIFIED:
        raise ValueError(f"puma misclassified must be one of {PUMA_MISCLASSIFIED}, got {misclassified!r}")
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
    eps[keep & (margins <= 0)] = 0.0 if misclassified == "eps_zero" else eps_min
    return eps


def puma_drop(
    margins: np.ndarray, keep: np.ndarray, prunable: np.ndarray, misclassified: str = "eps_min"
) -> np.ndarray:
    """The keep mask (N,) bool after PUMA's `misclassified='drop'`: kept prunable samples with margin <= 0 removed
    (not replaced, so fewer than keep_ratio remain). Samples outside `prunable` stay kept. Other settings: `keep` unchanged."""
    if misclassified != "drop":
        return keep
    return keep & ~(np.asarray(prunable, bool) & (margins <= 0))


MARGIN_STRATEGIES = ("prune_easy", "prune_hard", "puma")  # they rank DeepFool margins


def problems(
    strategy: str,
    *,
    keep_ratio: float,
    base_eps: float,
    score: str | None,
    score_norm: str | None = None,
    attack_norm: str | None = None,
    puma: dict | None = None,
) -> list[str]:
    """What makes a selection impossible or meaningless, one line each naming the config key ([] when none).

    score: the name of the score the strategy ranks (None when there is none);
    score_norm: the norm DeepFool margins were measured in; attack_norm: the
    training attack's norm. PUMA compares margins with the training eps, so both
    norms must agree.
    """
    out = []
    if strategy not in STRATEGIES:
        return [f"pruning.strategy={strategy!r} is not a strategy; allowed: {', '.join(STRATEGIES)}"]
    if not 0.0 < keep_ratio <= 1.0:
        out.append(f"pruning.keep_ratio={keep_ratio!r} must be in (0, 1]: the fraction of prunable samples kept")
    if not base_eps > 0:
        out.append(f"attack.eps={base_eps!r} must be > 0")
    if strategy != "random" and score is None:
        out.append(f"pruning.strategy={strategy!r} ranks a score, but none is computed")
    if strategy in MARGIN_STRATEGIES and score is not None and score != "margin":
        out.append(
            f"pruning.strategy={strategy!r} ranks DeepFool margins, but scoring.score={score!r}; "
            "set scoring.score=margin, or use keep_top / keep_bottom for other scores"
        )
    if strategy == "puma" and score == "margin" and score_norm != attack_norm:
        out.append(
            f"pruning.strategy='puma' compares margins with the training eps, so scoring.deepfool.norm ({score_norm!r}) "
            f"must equal attack.norm ({attack_norm!r})"
        )
    if strategy == "puma":
        options = dict(puma or {})
        if options.get("rule", "below_eps") not in PUMA_RULES:
            out.append(f"pruning.puma.rule={options.get('rule')!r}; allowed: {', '.join(PUMA_RULES)}")
        eps_min = options.get("eps_min", 0.0)
        if base_eps > 0 and not 0.0 <= eps_min <= base_eps:
            out.append(f"pruning.puma.eps_min={eps_min!r} must be in [0, attack.eps={base_eps}]")
        if not options.get("scale", 1.0) > 0:
            out.append(f"pruning.puma.scale={options.get('scale')!r} must be > 0")
        if not 0.0 <= options.get("low_fraction", 0.1) <= 1.0:
            out.append(f"pruning.puma.low_fraction={options.get('low_fraction')!r} must be in [0, 1]")
        if options.get("misclassified", "eps_min") not in PUMA_MISCLASSIFIED:
            out.append(
                f"pruning.puma.misclassified={options.get('misclassified')!r}; allowed: {', '.join(PUMA_MISCLASSIFIED)}"
            )
    return out


def select(
    strategy: str,
    *,
    scores: np.ndarray | None,
    labels: np.ndarray,
    eligible: np.ndarray,
    prunable: np.ndarray,
    keep_ratio: float,
    base_eps: float,
    class_balanced: bool = False,
    seed: int = 0,
    score: str | None = None,
    score_norm: str | None = None,
    attack_norm: str | None = None,
    puma: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Applies a named strategy to full-length pool arrays -> (keep (N,) bool, eps (N,) float32).

    scores (N,) (NaN allowed outside `eligible`), labels (N,). Only `eligible` rows
    (N,) bool can be kept (the others, e.g. a validation slice, never are); among
    them the rows outside `prunable` are always kept. `score`, `score_norm` and
    `attack_norm` name what the scores are, checked by `problems` (ValueError).

    random: a uniform random subset. prune_easy: drop the highest scores (margins).
    prune_hard: drop the lowest. puma: prune_easy plus `puma_eps` on the kept samples,
    with `puma` holding puma_eps's keyword options. keep_top / keep_bottom: keep the
    highest / lowest scores of any score (keep_top of DU is the extrapolation
    paper's rule; keep_bottom of a margin is prune_easy).
    """
    found = problems(
        strategy,
        keep_ratio=keep_ratio,
        base_eps=base_eps,
        score=None if strategy == "random" else score,
        score_norm=score_norm,
        attack_norm=attack_norm,
        puma=puma,
    )
    n = len(labels)
    for name, array in (("eligible", eligible), ("prunable", prunable)) + (
        (("scores", scores),) if strategy != "random" else ()
    ):
        if array is None or len(array) != n:
            found.append(
                f"{name} must hold one entry per pool sample ({n}), got {None if array is None else len(array)}"
            )
    if found:
        raise ValueError("cannot select: " + "; ".join(found))
    eligible = np.asarray(eligible, bool)
    sub_scores = None if strategy == "random" else np.asarray(scores)[eligible]
    if sub_scores is not None:
        # Rows that are always kept need no score (a protocol may leave them unscored), but PUMA reads every kept margin.
        needs_score = np.ones(len(sub_scores), bool) if strategy == "puma" else np.asarray(prunable, bool)[eligible]
        bad = needs_score & ~np.isfinite(sub_scores)
        if bad.any():
            raise ValueError(f"{int(bad.sum())} eligible samples have a non-finite {score} score")
        sub_scores = np.where(needs_score, sub_scores, 0.0)
    keep_sub, eps_sub = _select_among(
        strategy,
        sub_scores,
        np.asarray(labels)[eligible],
        np.asarray(prunable, bool)[eligible],
        keep_ratio,
        base_eps,
        class_balanced,
        seed,
        puma,
    )
    keep = np.zeros(n, bool)
    eps = np.full(n, base_eps, np.float32)
    keep[eligible], eps[eligible] = keep_sub, eps_sub
    return keep, eps


def _select_among(strategy, scores, labels, prunable, keep_ratio, base_eps, class_balanced, seed, puma):
    """`select` over the eligible rows only (every array of their length)."""
    n = len(labels)
    group_labels = labels if class_balanced else None
    if strategy == "random":
        random_scores = np.random.default_rng([seed, 1]).random(n)
        keep = keep_by_score(random_scores, prunable, keep_ratio, keep="lowest", labels=group_labels, seed=seed)
        return keep, np.full(n, base_eps, np.float32)
    keep_side = "highest" if strategy in ("prune_hard", "keep_top") else "lowest"
    keep = keep_by_score(scores, prunable, keep_ratio, keep=keep_side, labels=group_labels, seed=seed)
    if strategy == "puma":
        eps = puma_eps(scores, keep, base_eps, **(puma or {}))
        return puma_drop(scores, keep, prunable, (puma or {}).get("misclassified", "eps_min")), eps
    return keep, np.full(n, base_eps, np.float32)
