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
    # The rule is strict (exactly 0.5 points is still improving), and the shortest length has nothing to gain over.
    assert study.meets_rule(0.0049) and not study.meets_rule(0.005) and not study.meets_rule(None)
    # The tables' label applies the same rule to the stored curve as the choice did.
    assert study.length_used({"convergence": marked, "epochs": 57}) == "chosen"
    assert study.length_used({"convergence": marked, "epochs": 76}) == "used: the longest; rule not met"
    assert study.length_used({"convergence": marked, "epochs": 100}) == "given by --epochs"


def _row(method, seed, pgd, ratio=0.5, pool=20_000):
    row = {"pool": pool, "keep_ratio": ratio, "method": method, "seed": seed, "kind": "pruned"}
    for split in study.SPLITS:
        for metric in study.METRICS:
            # the held-out split 0.1 above the test split, so a split's figures under the other's header fail
            row[f"{split}_{metric}"] = (pgd if metric == "pgd" else 0.8) + (0.1 if split == "held_out" else 0.0)
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


def test_per_seed_keep_ratios_override_the_common_ones():
    import argparse

    args = argparse.Namespace(ratios=[0.5, 0.25], ratios_of=["1=0.25", "2=0.5,0.1"])
    assert study.ratios_of(args, 0) == [0.5, 0.25] and study.ratios_of(args, 1) == [0.25]
    assert study.ratios_of(args, 2) == [0.5, 0.1]


def test_the_grid_full_pool_at_seed_0_is_the_convergence_run_of_its_length_without_its_evaluation(tmp_path):
    """The convergence run of L trained exactly what the grid's full pool at seed 0 of the largest pool trains: it is
    copied (training, checkpoints, settings) less what the evaluate phase wrote, so that phase alone runs again."""
    import argparse
    import json

    source = tmp_path / "pool200000" / "convergence" / "epochs57"
    (source / "settings").mkdir(parents=True)
    (source / "checkpoints" / "684").mkdir(parents=True)
    for name in ("results.json", "report.md", "settings/evaluate.json", "settings/train.json", "lock"):
        (source / name).write_text("{}")
    (source / "timings.json").write_text(json.dumps({"train": 50.0, "evaluate": 9.0}))
    (source / "data").symlink_to(tmp_path)
    runner = study.StudyV3.__new__(study.StudyV3)  # no mesh: only its paths are used here
    runner.args = argparse.Namespace(workdir=str(tmp_path), pools=[20_000, 200_000], finished_only=False)
    name = "epochs57/seed0/full_pool"
    assert runner.reuse_convergence_run(200_000, 0, 57, name) == os.path.join("convergence", "epochs57")
    target = tmp_path / "pool200000" / name
    assert (target / "checkpoints" / "684").is_dir() and (target / "settings" / "train.json").exists()
    for gone in ("results.json", "report.md", "settings/evaluate.json", "lock"):
        assert not (target / gone).exists(), gone
    assert json.loads((target / "timings.json").read_text()) == {"train": 50.0}
    assert (target / "data").is_symlink()
    # Once evaluated, a rerun leaves it alone; other seeds, pools and lengths train their own.
    (target / "results.json").write_text("{}")
    assert runner.reuse_convergence_run(200_000, 0, 57, name) is not None and (target / "results.json").exists()
    assert runner.reuse_convergence_run(200_000, 1, 57, "epochs57/seed1/full_pool") is None
    assert runner.reuse_convergence_run(20_000, 0, 57, "x") is None
    assert runner.reuse_convergence_run(200_000, 0, 76, "y") is None


def test_the_tables_show_every_cell_its_seeds_and_the_paired_differences():
    """study.tables (the .md) and the documents' renderers (benchmarks/tables.py) read the same result."""
    import tables as doc_tables

    rows = []
    for seed, (rand, puma) in enumerate(((0.60, 0.62), (0.70, 0.69))):
        for method, pgd in (("random", rand), ("puma", puma)):
            row = _row(method, seed, pgd) | {"score": "margin" if method == "puma" else None, "kept": 10_000}
            row |= {
                "epochs": 32,
                "score_s": 30.0,
                "select_s": 0.5,
                "train_s": 300.0,
                "compute_s": 330.5,
                "margin_model_train_s": 300.0,
            }
            rows.append(row)
    curve = [{"epochs": 24, "held_out_pgd": 0.6}, {"epochs": 32, "held_out_pgd": 0.602}]
    curve = [p | {"held_out_clean": 0.9, "test_pgd": 0.5, "train_s": 20.0} for p in study.converged_length(curve)[1]]
    result = {
        "settings": {"pools": [20_000], "held_out": 10_000, "subset_fraction": 0.05},
        "epochs": 32,
        "convergence": curve,
        "runs": rows,
        "table": study.summarise(rows),
        "paired": study.paired_differences(rows),
        "scoring_costs": study.scoring_costs(rows),
    }
    text = "\n".join(study.tables(result))
    assert "| 32 (chosen) | 90.0 | 60.2 | +0.20 (vs 24) | 50.0 | 20 |" in text
    result["convergence"][1]["gain"] = 0.01  # the rule not met: the longest length is used, and said so
    assert "| 32 (used: the longest; rule not met) |" in "\n".join(study.convergence_table(result))
    held_out, test = "90.0 (90.0..90.0) | 75.0 (70.0..80.0)", "80.0 (80.0..80.0) | 65.0 (60.0..70.0)"
    assert f"| 20,000 | random | 0.5 | 10,000 | 2 | {held_out} | 90.0 (90.0..90.0) | {test} |" in text
    assert "| held-out clean | held-out PGD-20 | held-out APGD-CE+T | test clean | test PGD-20 |" in text
    assert "| 20,000 | puma | 0.5 | 2 | +0.0 (+0.0..+0.0) | +0.5 (-1.0..+2.0) |" in text
    assert text.endswith("| 20,000 | 30 | 300 |  |")  # margins scored; no DU run in this grid
    assert doc_tables.RENDERERS["study_v3_paired"](result) == study.paired_table(result)


def test_finished_only_runs_nothing_and_lists_what_did_not_run(tmp_path):
    import argparse

    runner = study.StudyV3.__new__(study.StudyV3)  # no mesh: nothing may run
    runner.args = argparse.Namespace(workdir=str(tmp_path), pools=[200_000], finished_only=True)
    runner.rows, runner.not_run = [], []
    config = study.v3_config(200_000, 1, 427, strategy="puma", keep_ratio=0.25, score="margin")
    assert runner.run("epochs427/seed1/puma_keep0.25", "puma", config, kind="pruned", score="margin") is None
    assert runner.not_run == ["pool200000/epochs427/seed1/puma_keep0.25"] and runner.rows == []
    assert not any(tmp_path.iterdir())  # no work directory, score directory or data link was made
    # A finished convergence run of that length is not copied either: the grid's full pool stays "not run".
    (tmp_path / "pool200000" / "convergence" / "epochs427").mkdir(parents=True)
    (tmp_path / "pool200000" / "convergence" / "epochs427" / "results.json").write_text("{}")
    runner.reuse_convergence_run(200_000, 0, 427, "epochs427/seed0/full_pool")
    assert not (tmp_path / "pool200000" / "epochs427").exists()
