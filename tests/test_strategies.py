"""Selection strategies on synthetic score vectors: exact counts, balance, eps bounds."""

import functools

import numpy as np
import pytest

from jax_advprune.pruning import strategies
from jax_advprune.pruning.strategies import keep_by_score, puma_eps

N = 1000
BASE_EPS = 0.1
# Every row eligible, scores named as DeepFool L-inf margins under an L-inf attack: the pipeline's PUMA setting.
select = functools.partial(
    strategies.select, eligible=np.ones(N, bool), score="margin", score_norm="linf", attack_norm="linf"
)


@pytest.fixture
def scored():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), N // 10)
    margins = rng.normal(0.15, 0.1, N).astype(np.float32)
    prunable = np.arange(N) >= 200  # the first 200 are 'original' and never pruned
    return labels, margins, prunable


def test_prune_easy_drops_exactly_the_highest_margins(scored):
    labels, margins, prunable = scored
    keep, eps = select(
        "prune_easy", scores=margins, labels=labels, prunable=prunable, keep_ratio=0.25, base_eps=BASE_EPS
    )
    assert keep[~prunable].all()
    kept = np.flatnonzero(keep & prunable)
    assert len(kept) == 200  # 25% of 800
    assert margins[kept].max() <= margins[prunable & ~keep].min()
    assert np.all(eps == BASE_EPS)


def test_prune_hard_drops_exactly_the_lowest_margins(scored):
    labels, margins, prunable = scored
    keep, _ = select("prune_hard", scores=margins, labels=labels, prunable=prunable, keep_ratio=0.5, base_eps=BASE_EPS)
    kept = np.flatnonzero(keep & prunable)
    assert len(kept) == 400
    assert margins[kept].min() >= margins[prunable & ~keep].max()


def test_random_keeps_exact_count_and_is_seeded(scored):
    labels, margins, prunable = scored
    a, _ = select("random", scores=None, labels=labels, prunable=prunable, keep_ratio=0.3, base_eps=BASE_EPS, seed=1)
    b, _ = select("random", scores=None, labels=labels, prunable=prunable, keep_ratio=0.3, base_eps=BASE_EPS, seed=1)
    c, _ = select("random", scores=None, labels=labels, prunable=prunable, keep_ratio=0.3, base_eps=BASE_EPS, seed=2)
    assert (a & prunable).sum() == 240
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_class_balanced_keeps_the_ratio_in_every_class(scored):
    labels, margins, prunable = scored
    margins = margins + labels * 1.0  # without balancing, prune_easy would empty the high classes
    keep, _ = select(
        "prune_easy",
        scores=margins,
        labels=labels,
        prunable=prunable,
        keep_ratio=0.5,
        base_eps=BASE_EPS,
        class_balanced=True,
    )
    for c in range(10):
        members = prunable & (labels == c)
        assert (keep & members).sum() == round(0.5 * members.sum())


def test_puma_lowers_eps_below_margin_and_never_above_base(scored):
    labels, margins, prunable = scored
    keep, eps = select(
        "puma",
        scores=margins,
        labels=labels,
        prunable=prunable,
        keep_ratio=0.5,
        base_eps=BASE_EPS,
        puma={"rule": "below_eps", "scale": 1.0, "eps_min": 0.01},
    )
    np.testing.assert_array_equal(
        keep,
        select("prune_easy", scores=margins, labels=labels, prunable=prunable, keep_ratio=0.5, base_eps=BASE_EPS)[0],
    )
    assert eps.max() <= BASE_EPS and eps.min() >= 0.01
    low = keep & (margins < BASE_EPS)
    np.testing.assert_allclose(eps[low], np.clip(margins[low], 0.01, BASE_EPS))
    assert np.all(eps[~low] == BASE_EPS)
    assert np.all(eps[keep & (margins <= 0)] == 0.01)  # misclassified samples get eps_min


def test_puma_low_fraction_rule_lowers_exactly_that_fraction():
    margins = np.linspace(0.0, 0.2, 100).astype(np.float32)
    keep = np.ones(100, bool)
    eps = puma_eps(margins, keep, BASE_EPS, rule="low_fraction", low_fraction=0.2, scale=0.5)
    lowered = eps < BASE_EPS
    assert lowered.sum() == 20 and lowered[:20].all()
    np.testing.assert_allclose(eps[:20], 0.5 * margins[:20])


def test_ties_are_broken_at_random_not_by_file_order():
    scores = np.zeros(1000)
    keep = keep_by_score(scores, np.ones(1000, bool), 0.5, keep="lowest", seed=0)
    assert 200 < keep[:500].sum() < 300  # not the first half of a class-sorted file


def test_bad_arguments_are_refused(scored):
    labels, margins, prunable = scored
    with pytest.raises(ValueError, match="is not a strategy"):
        select("prune_medium", scores=margins, labels=labels, prunable=prunable, keep_ratio=0.5, base_eps=BASE_EPS)
    with pytest.raises(ValueError, match="keep_ratio"):
        select("prune_easy", scores=margins, labels=labels, prunable=prunable, keep_ratio=1.5, base_eps=BASE_EPS)
    with pytest.raises(ValueError, match="one entry per pool sample"):
        select("puma", scores=margins[:10], labels=labels, prunable=prunable, keep_ratio=0.5, base_eps=BASE_EPS)


@pytest.mark.parametrize("strategy,twin", [("keep_top", "prune_hard"), ("keep_bottom", "prune_easy")])
def test_keep_top_and_bottom_keep_exact_counts_of_any_score(scored, strategy, twin):
    labels, margins, prunable = scored
    scores = -margins * 3.0 + 1.0  # any score, not only margins
    keep, eps = select(
        strategy,
        scores=scores,
        labels=labels,
        prunable=prunable,
        keep_ratio=0.3,
        base_eps=BASE_EPS,
        class_balanced=True,
    )
    assert keep[~prunable].all() and np.all(eps == BASE_EPS)
    classes = range(2, 10)  # classes 0 and 1 lie in the 200 unprunable rows
    for c in classes:  # 30% of each class's 100 prunable samples
        assert (keep & prunable & (labels == c)).sum() == 30
    kept, dropped = scores[keep & prunable], scores[prunable & ~keep]
    if strategy == "keep_top":
        assert all(
            scores[keep & prunable & (labels == c)].min() >= scores[prunable & ~keep & (labels == c)].max()
            for c in classes
        )
    else:
        assert all(
            scores[keep & prunable & (labels == c)].max() <= scores[prunable & ~keep & (labels == c)].min()
            for c in classes
        )
    same, _ = select(
        twin, scores=scores, labels=labels, prunable=prunable, keep_ratio=0.3, base_eps=BASE_EPS, class_balanced=True
    )
    np.testing.assert_array_equal(keep, same)
    assert len(kept) + len(dropped) == 800


def test_rows_outside_the_eligibility_mask_are_never_kept_and_keep_the_base_eps(scored):
    labels, margins, prunable = scored
    eligible = np.ones(N, bool)
    eligible[::7] = False  # e.g. a validation slice
    margins = np.where(eligible, margins, np.nan)  # unscored there
    keep, eps = select(
        "puma", scores=margins, labels=labels, prunable=prunable, keep_ratio=0.5, base_eps=BASE_EPS, eligible=eligible
    )
    assert not keep[~eligible].any() and np.all(eps[~eligible] == BASE_EPS)
    assert (keep & eligible & ~prunable).sum() == (eligible & ~prunable).sum()  # unprunable eligible rows all kept
    assert (keep & prunable).sum() == round(0.5 * (eligible & prunable).sum())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(score="el2n"), "ranks DeepFool margins"),
        (dict(score_norm="l2"), "must equal attack.norm"),
        (dict(keep_ratio=0.0), "keep_ratio"),
        (dict(base_eps=-1.0), "attack.eps"),
        (dict(puma={"eps_min": 0.5}), "eps_min"),
    ],
)
def test_puma_preconditions_hold_for_direct_calls(scored, kwargs, message):
    labels, margins, prunable = scored
    arguments = dict(scores=margins, labels=labels, prunable=prunable, keep_ratio=0.5, base_eps=BASE_EPS) | kwargs
    with pytest.raises(ValueError, match=message):
        select("puma", **arguments)


def test_a_non_finite_score_on_an_eligible_row_is_refused(scored):
    labels, margins, prunable = scored
    margins = margins.copy()
    margins[500] = np.nan
    with pytest.raises(ValueError, match="non-finite margin"):
        select("prune_easy", scores=margins, labels=labels, prunable=prunable, keep_ratio=0.5, base_eps=BASE_EPS)


@pytest.mark.parametrize("misclassified,expected_eps", [("eps_min", 0.01), ("eps_zero", 0.0), ("drop", None)])
def test_puma_misclassified_setting_trains_them_at_eps_min_at_zero_or_drops_them(scored, misclassified, expected_eps):
    labels, margins, prunable = scored
    margins = np.abs(margins) + 1e-3
    margins[:300] *= -1  # 200 originals (always kept) and 100 prunable rows misclassified
    puma = {"rule": "low_fraction", "low_fraction": 0.01, "eps_min": 0.01, "misclassified": misclassified}
    keep, eps = select(
        "puma", scores=margins, labels=labels, prunable=prunable, keep_ratio=0.5, base_eps=BASE_EPS, puma=puma
    )
    easy_keep = select(
        "prune_easy", scores=margins, labels=labels, prunable=prunable, keep_ratio=0.5, base_eps=BASE_EPS
    )[0]
    wrong = margins <= 0
    assert (easy_keep & wrong & prunable).sum() == 100  # the lowest margins: all kept by prune_easy
    if expected_eps is None:
        np.testing.assert_array_equal(keep, easy_keep & ~(wrong & prunable))  # dropped, not replaced
        assert keep[~prunable].all()  # an original is never dropped: it gets eps_min
        assert np.all(eps[~prunable & wrong] == 0.01)
    else:
        np.testing.assert_array_equal(keep, easy_keep)
        # whatever the rule: low_fraction 0.01 lowers 6 of the kept rows, yet all 300 misclassified get the setting's eps
        assert np.all(eps[keep & wrong] == expected_eps)
        assert np.all(eps[keep & ~wrong] > 0.01)


def test_puma_misclassified_setting_is_checked():
    with pytest.raises(ValueError, match=r"pruning.puma.misclassified='remove'; allowed: eps_min, eps_zero, drop"):
        select(
            "puma",
            scores=np.ones(N, np.float32),
            labels=np.zeros(N, int),
            prunable=np.ones(N, bool),
            keep_ratio=0.5,
            base_eps=BASE_EPS,
            puma={"misclassified": "remove"},
        )


def test_rows_that_are_always_kept_need_no_score_except_for_puma(scored):
    labels, scores, prunable = scored
    scores = np.where(
        prunable, scores, np.nan
    )  # the originals unscored (the reference history protocol, scope 'synthetic')
    keep, _ = strategies.select(
        "keep_top",
        scores=scores,
        labels=labels,
        eligible=np.ones(N, bool),
        prunable=prunable,
        keep_ratio=0.5,
        base_eps=BASE_EPS,
        score="du",
    )
    assert keep[~prunable].all() and (keep & prunable).sum() == 400
    np.testing.assert_array_equal(keep[prunable], scores[prunable] >= np.median(scores[prunable]))
    with pytest.raises(ValueError, match="200 eligible samples have a non-finite margin score"):
        select("puma", scores=scores, labels=labels, prunable=prunable, keep_ratio=0.5, base_eps=BASE_EPS)
