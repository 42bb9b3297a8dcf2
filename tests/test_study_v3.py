"""Study v3's rules (benchmarks/pruning_study_v3.py): where the final training counts as converged, and the paired
differences against random, on hand-made figures whose answers are known."""

import os
import sys

import pytest
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import pruning_study_v3 as study  # noqa: E402


def test_the_converged_length_is_the_first_that_gains_under_half_a_point_over_its_last_quarter():
    curve = [
        {"epochs": 24, "held_out_pgd": 0.600},
        {"epochs": 32, "held_out_pgd": 0.650},  # +5.0 points over 24
        {"epochs": 43, "held_out_pgd": 0.680},  # +3.0 over 32 (nearest 0.75 x 43 = 32.25)
        {"epochs": 57, "held_out_pgd": 0.684},  # +0.4 over 43: converged
        {"epochs": 76, "held_out_pgd": 0.700},
    ]
    chosen, marked = study.converged_length(curve)
    assert chosen == 57
    assert marked[0]["gain"] is None and marked[0]["compared_with"] is None
    assert [m["compared_with"] for m in marked[1:]] == [24, 32, 43, 57]
    assert marked[3]["gain"] == pytest.approx(0.004)
    # Nothing converged: None (the study then trains the longest length and says so).
    assert study.converged_length(curve[:3])[0] is None
    # A loss counts as converged too (the accuracy stopped improving).
    assert study.converged_length([{"epochs": 40, "held_out_pgd": 0.7}, {"epochs": 53, "held_out_pgd": 0.69}])[0] == 53


def _row(method, seed, pgd, ratio=0.5, pool=20_000):
    row = {"pool": pool, "keep_ratio": ratio, "method": method, "seed": seed, "kind": "pruned"}
    for split in study.SPLITS:
        for metric in study.METRICS:
            row[f"{split}_{metric}"] = pgd if metric == "pgd" else 0.9
    return row


def test_paired_differences_pair_each_seed_with_random_at_the_same_pool_ratio_and_seed():
    rows = [
        _row("random", 0, 0.60),
        _row("random", 1, 0.70),
        _row("puma", 0, 0.62),
        _row("puma", 1, 0.69),
        _row("puma", 2, 0.99),  # no random run at seed 2: left out, not paired with another seed
        _row("random", 0, 0.10, ratio=0.25),  # another keep ratio: not a partner
        _row("puma", 0, 0.50, pool=200_000),  # another pool without random: no line
    ]
    (line,) = study.paired_differences(rows)
    assert (line["pool"], line["keep_ratio"], line["method"], line["seeds"]) == (20_000, 0.5, "puma", [0, 1])
    diff = line["held_out_pgd"]
    assert diff["mean"] == pytest.approx(0.005) and diff["min"] == pytest.approx(-0.01)
    assert diff["max"] == pytest.approx(0.02) and diff["n"] == 2
    assert line["test_clean"]["mean"] == pytest.approx(0.0)


def test_the_du_history_run_trains_as_many_steps_as_a_final_run_and_at_least_its_window():
    # 5% of 20,000 = 1,000 images: 8 steps a pass; a final run of 76 epochs is 912 steps -> 114 passes.
    assert study.du_passes(1000, 76, 128) == 114
    # 5% of 200,000 = 10,000 images: 79 steps a pass -> 912 / 79 = 11.5 -> 12 passes.
    assert study.du_passes(10_000, 76, 128) == 12
    # A short final run still gives DU its window of records.
    assert study.du_passes(10_000, 3, 128) == 10


def test_per_pool_seeds_override_the_common_ones():
    import argparse

    args = argparse.Namespace(seeds=[0, 1, 2], seeds_of=["20000=0", "5000=3,4"])
    assert study.seeds_of(args, 20_000) == [0] and study.seeds_of(args, 5000) == [3, 4]
    assert study.seeds_of(args, 200_000) == [0, 1, 2]
