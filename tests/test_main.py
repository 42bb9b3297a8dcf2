"""The command line end to end on the :smoke variant, and phase skipping on a rerun."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, main_command, run_main

pytestmark = pytest.mark.slow  # whole runs of the command, minutes each


def test_smoke_run_writes_every_phase_output(smoke_run):
    workdir, first = smoke_run
    for rel in [
        "data/synthetic.npz",
        "scores/margin.npy",
        "scores/converged.npy",
        "scores/meta.json",
        "selection/keep.npy",
        "selection/eps.npy",
        "selection/meta.json",
        "metrics.jsonl",
        "results.json",
        "report.md",
    ]:
        assert os.path.exists(workdir / rel), rel
    assert os.listdir(workdir / "checkpoints")
    pool_size = 1528 + 2000
    margin = np.load(workdir / "scores/margin.npy")
    keep = np.load(workdir / "selection/keep.npy")
    eps = np.load(workdir / "selection/eps.npy")
    assert margin.shape == keep.shape == eps.shape == (pool_size,)
    held_out = json.load(open(workdir / "selection/meta.json"))["held_out_for_validation"]
    from jax_advprune.data.splits import validation_indices

    assert held_out == 32 and not keep[validation_indices(1528, 32, seed=0)].any()
    assert keep.sum() == round(0.5 * (pool_size - held_out))  # the held-out slice is neither kept nor counted
    assert eps.max() <= 0.05 + 1e-7
    assert os.listdir(workdir / "checkpoints_best")  # best by validation PGD accuracy
    validation = [json.loads(line) for line in open(workdir / "metrics.jsonl") if "val_pgd_accuracy" in line]
    assert validation and all(0 <= v["val_pgd_accuracy"] <= v["val_clean_accuracy"] <= 1 for v in validation)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "tensorboard" / "train"))
    results = json.load(open(workdir / "results.json"))
    for weights in ("raw", "ema", "best_ema"):
        assert (
            0.0 <= results["results"][weights]["pgd_accuracy"] <= results["results"][weights]["clean_accuracy"] <= 1.0
        )
    # The evaluated best checkpoint is the one with the highest validation PGD accuracy of the final training run.
    train_validation = {v["step"]: v["val_pgd_accuracy"] for v in validation if v["phase"] == "train"}
    assert train_validation[results["best_validation_step"]] == max(train_validation.values())
    if results["best_validation_step"] == results["checkpoint_step"]:  # same weights, same attack seed
        assert results["results"]["best_ema"] == results["results"]["ema"]
    assert "EMA, best validation" in open(workdir / "report.md").read()
    # What produced the numbers, and how far they can be trusted.
    n = results["test_size"]
    assert n == 269 and results["seed"] == 0 and results["devices"]["count"] == 4 and results["code"]["version"]
    assert set(results["wall_seconds"]) == {"score", "select", "train", "evaluate"}
    for weights, r in results["results"].items():
        for name, value in r.items():
            if not name.endswith("_se"):
                assert abs(r[name + "_se"] - np.sqrt(value * (1 - value) / n)) < 1e-12
    assert "±" in open(workdir / "report.md").read()
    assert "[evaluate] ema weights" in open(workdir / "run.log").read()
    assert any(
        name.startswith("events.out.tfevents")
        for _, _, files in os.walk(workdir / "tensorboard" / "evaluate")
        for name in files
    )
    assert sorted(os.listdir(workdir / "settings")) == [
        "evaluate.json",
        "inputs.json",
        "score.json",
        "select.json",
        "train.json",
    ]
    phases = {json.loads(line)["phase"] for line in open(workdir / "metrics.jsonl")}
    assert {"score/train", "score/deepfool", "train"} <= phases
    assert "img/s" in first.stdout and "ETA" in first.stdout


def test_second_invocation_skips_finished_phases_and_keeps_outputs(smoke_run):
    workdir, _ = smoke_run
    before = {
        rel: os.path.getmtime(workdir / rel)
        for rel in ["scores/margin.npy", "selection/keep.npy", "results.json", "data/synthetic.npz"]
    }
    metrics_lines = len(open(workdir / "metrics.jsonl").readlines())
    second = run_main(workdir)
    assert second.returncode == 0, second.stdout + second.stderr
    for phase in ("score", "select", "evaluate"):
        assert f"[{phase}] complete, skipped" in second.stdout
    assert "[train] complete" in second.stdout
    assert {rel: os.path.getmtime(workdir / rel) for rel in before} == before
    assert len(open(workdir / "metrics.jsonl").readlines()) == metrics_lines


def _tree_bytes(root) -> dict:
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(root)
        for f in files
    }


def test_the_selection_exports_for_pytorch_trainers_row_by_row(smoke_run, tmp_path):
    """python -m jax_advprune.export_selection: kept synthetic rows as DM-Improves-AT npz parts, eps and pool indices aligned."""
    from jax_advprune.data.sources import NpzPart

    workdir, _ = smoke_run
    keep, eps = np.load(workdir / "selection/keep.npy"), np.load(workdir / "selection/eps.npy")
    kept_synthetic = np.flatnonzero(keep & (np.arange(len(keep)) >= 1528))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jax_advprune.export_selection",
            "--workdir",
            str(workdir),
            "--out",
            str(tmp_path / "sel"),
            "--part-size",
            "400",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.load(open(tmp_path / "sel" / "selection.json"))
    assert summary["rows"] == len(kept_synthetic) and [p["rows"] for p in summary["parts"]][:-1] == [400] * (
        len(summary["parts"]) - 1
    )
    assert summary["kept_original_not_exported"] == int(keep[:1528].sum())
    synthetic = NpzPart(str(workdir / "data/synthetic.npz"), 10)
    index = np.concatenate([np.load(tmp_path / "sel" / p["pool_index"]) for p in summary["parts"]])
    np.testing.assert_array_equal(index, kept_synthetic)
    images = np.concatenate(
        [NpzPart(str(tmp_path / "sel" / p["images"]), 10).read(np.arange(p["rows"]))[0] for p in summary["parts"]]
    )
    labels = np.concatenate([np.load(tmp_path / "sel" / p["images"])["label"] for p in summary["parts"]])
    expected_images, expected_labels = synthetic.read(kept_synthetic - 1528)
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_array_equal(
        np.concatenate([np.load(tmp_path / "sel" / p["eps"]) for p in summary["parts"]]), eps[kept_synthetic]
    )
    assert summary["eps"]["lowered"] == int((eps[kept_synthetic] < 0.05).sum()) > 0


def test_any_weights_can_be_evaluated_alone_and_training_can_start_from_them(smoke_run, tmp_path):
    """--phases=evaluate with eval.init_from (a work dir: its best EMA weights); train.init_from (one of its checkpoints)."""
    workdir, _ = smoke_run
    source = json.load(open(workdir / "results.json"))
    evaluated = run_main(
        tmp_path / "eval",
        "--phases=evaluate",
        f"--config.eval.init_from={workdir}",
        "--config.eval.generated_test_size=300",
    )
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    results = json.load(open(tmp_path / "eval" / "results.json"))
    assert list(results["results"]) == ["given"] and results["init_from"] == str(workdir) and results["kept"] is None
    # The same weights, the same attack seed: the test split's figures do not move when a held-out split is added.
    assert results["results"]["given"] == source["results"]["best_ema"]
    report = open(tmp_path / "eval" / "report.md").read()
    assert "given weights" in report
    # The held-out generated split, beside the test split: its own accuracies and standard errors, labelled.
    held_out = results["held_out_generated"]
    assert held_out["size"] == 300 and "not real data" in held_out["what"]
    given = held_out["results"]["given"]
    assert 0 <= given["autoattack_lite_accuracy"] <= given["apgd_ce_accuracy"] <= given["clean_accuracy"] <= 1
    assert given["pgd_accuracy"] <= given["clean_accuracy"]
    assert given["clean_accuracy_se"] == pytest.approx(
        (given["clean_accuracy"] * (1 - given["clean_accuracy"]) / 300) ** 0.5
    )
    assert report.index("Test split: 269 images") < report.index("Held-out generated split: 300 images")
    assert report.count("| weights |") == 2 and "not real data" in report
    assert not (tmp_path / "eval" / "checkpoints").exists() and not (tmp_path / "eval" / "selection").exists()
    step = source["checkpoint_step"]
    started = run_main(
        tmp_path / "warm",
        "--config.pruning.strategy=random",
        f"--config.train.init_from={workdir / 'checkpoints' / str(step)}",
        "--config.train.epochs=0.1",
        "--config.train.lr=1e-4",
        "--config.eval.attack=pgd",
    )
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
    warm = json.load(open(tmp_path / "warm" / "results.json"))["results"]["raw"]
    assert (
        warm["clean_accuracy"] > 0.3
    )  # the source's weights, barely moved (a fresh model after 2 steps is near chance, 0.1)


def test_changed_or_bad_settings_on_an_existing_workdir_are_refused_and_a_corrected_rerun_succeeds(smoke_run):
    workdir, _ = smoke_run
    before = _tree_bytes(workdir)
    third = run_main(workdir, "--config.pruning.keep_ratio=0.75")
    assert third.returncode == 2 and "Traceback" not in third.stderr
    assert "pruning.keep_ratio: 0.5 -> 0.75" in third.stderr
    typo = run_main(workdir, "--config.pruning.strategy=pumaa", "--config.eval.apgd_targets=10")
    assert typo.returncode == 2 and "pruning.strategy='pumaa'" in typo.stderr and "eval.apgd_targets=10" in typo.stderr
    assert _tree_bytes(workdir) == before  # byte-identical: nothing written, not even a lock or a log line
    corrected = run_main(workdir)
    assert corrected.returncode == 0, corrected.stdout[-3000:] + corrected.stderr[-3000:]
    assert "[evaluate] complete, skipped" in corrected.stdout


@pytest.mark.parametrize("config,devices", [("cifar10_trades", 24), ("cifar10_extrapolation", 3)])
def test_paper_config_smoke_variants_run_offline(tmp_path, config, devices):
    """configs/<paper>.py:smoke: TRADES, a WideResNet, 32x32x3 generated data, scoring, selection, validation, evaluation;
    each on a number of CPU devices that its batches do not divide (the mesh takes the largest count that does).
    configs/cifar10_puma.py:smoke runs in test_torch_interop, with margins from an imported checkpoint."""
    import importlib

    from jax_advprune.validate import mesh_size

    cmd = [
        sys.executable,
        "-m",
        "jax_advprune.main",
        "--config",
        os.path.join(REPO, f"configs/{config}.py:smoke"),
        "--workdir",
        str(tmp_path),
    ]
    if (
        config != "cifar10_trades"
    ):  # standard AutoAttack runs in the TRADES variant; APGD-CE + APGD-T here, for the suite's time
        cmd.append("--config.eval.attack=autoattack_lite")
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[train] trades" in proc.stdout and "best validation checkpoint" in proc.stdout
    results = json.load(open(tmp_path / "results.json"))
    mesh = mesh_size(importlib.import_module(f"configs.{config}").get_config("smoke"), devices)
    assert (
        results["devices"]["count"] == mesh < devices
        and f"the mesh spans {mesh} of the {devices} cpu devices" in proc.stdout
    )
    assert results["checkpoint_step"] == 16
    for weights in ("raw", "ema", "best_ema"):
        r = results["results"][weights]
        chain = (
            ["autoattack_accuracy", "fab_t_accuracy", "apgd_t_accuracy"]
            if config == "cifar10_trades"
            else ["autoattack_lite_accuracy"]
        )
        chain += ["apgd_ce_accuracy", "clean_accuracy"]
        assert 0.0 <= r[chain[0]] and all(r[a] <= r[b] for a, b in zip(chain, chain[1:])) and r["clean_accuracy"] <= 1.0
    if config == "cifar10_trades":
        assert "FAB-T (3 steps), Square (20 queries)" in open(tmp_path / "report.md").read()
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "metrics.jsonl") if '"lr"' in line]
    assert lrs and max(lrs) <= 0.2 + 1e-6
    selection = json.load(open(tmp_path / "selection/meta.json"))
    if config == "cifar10_trades":
        assert selection["kept"] == 1536 - 64 and not os.path.exists(tmp_path / "scores")
        _check_export_loads_into_the_reference_wide_resnet(tmp_path)
    else:  # half of the 1,024 synthetic images kept, originals whole
        assert selection["kept_original"] == 512 - 64 and abs(selection["kept_synthetic"] - 512) <= 10
        scores = json.load(open(tmp_path / "scores/meta.json"))
        assert scores["score"] == ("margin" if config == "cifar10_puma" else "du")
        if config == "cifar10_puma":
            assert selection["lowered_eps"] > 0 and selection["mean_eps_kept"] <= 8 / 255
        else:  # the reference's kNN: every scored row a reference, originals included, unit-length embedding
            assert scores["extrapolation"]["held_out"] == 0 and scores["extrapolation"]["normalize"] == "l2"
            computed = np.load(tmp_path / "scores/computed_scores.npz")
            du = np.load(tmp_path / "scores/du.npy")
            originals = computed["rows"] < 512
            assert originals.sum() == 512 - 64 and (~originals).sum() == 256
            np.testing.assert_array_equal(du[computed["rows"]], computed["values"])
            norms = np.linalg.norm(np.load(tmp_path / "scores/embedding.npy"), axis=1)
            np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
            check = subprocess.run(
                [sys.executable, "-m", "jax_advprune.check_extrapolation", "--workdir", str(tmp_path)],
                cwd=REPO, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert check.returncode == 0, check.stdout + check.stderr
            record = json.load(open(tmp_path / "scores/extrapolation_check.json"))
            assert record["held_out"] > 2 and np.isfinite(record["spearman"]) and record["k"] == 12
            assert f"Spearman {record['spearman']:.3f}" in check.stdout
            assert json.load(open(tmp_path / "selection/meta.json")) == selection  # the check changed nothing


def _check_export_loads_into_the_reference_wide_resnet(workdir):
    """`python -m jax_advprune.export` writes reference keys: strict load_state_dict into DM-Improves-AT's WideResNet."""
    import torch
    from test_torch_interop import RefWideResNet

    from jax_advprune.phases.weights import build_saved_model, saved_variables

    out = workdir / "model.pt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jax_advprune.export",
            "--workdir",
            str(workdir),
            "--weights",
            "best_ema",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reference = RefWideResNet(depth=10, width=1, act=torch.nn.SiLU).eval()
    reference.load_state_dict(torch.load(out))  # strict: the same keys, no more, no fewer
    settings, variables, _ = saved_variables(str(workdir), "best_ema")
    model = build_saved_model(settings)
    x = np.random.default_rng(0).uniform(0, 1, (4, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.tensor(x.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(np.asarray(model.apply(variables, x)), expected, atol=1e-4, rtol=1e-4)
    refused = subprocess.run(
        [sys.executable, "-m", "jax_advprune.export", "--workdir", str(workdir / "nothing"), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2 and "holds no trained model" in refused.stderr and "Traceback" not in refused.stderr


def test_extrapolated_dynamic_uncertainty_prunes_the_synthetic_pool(tmp_path):
    """Nieth et al.'s setup at smoke size: DU from a per-epoch history on a subset, kNN-extrapolated, keep_top."""
    proc = run_main(
        tmp_path,
        "--config.scoring.score=du",
        "--config.scoring.extrapolation.enabled=True",
        "--config.scoring.extrapolation.subset_size=500",
        "--config.scoring.train_epochs=6",
        "--config.scoring.du_window=5",
        "--config.pruning.strategy=keep_top",
        "--config.pruning.scope=synthetic",
        "--config.pruning.class_balanced=True",
        "--phases=score,select",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    meta = json.load(open(tmp_path / "scores/meta.json"))
    assert meta["score"] == "du" and meta["history_epochs"] == 6 and meta["scored"] == 1528 - 32 + 500
    assert -1.0 <= meta["extrapolation"]["spearman_held_out"] <= 1.0 and meta["extrapolation"]["k"] == 12
    assert (
        meta["extrapolation"]["knn_engine_used"] == "faiss" and "[score] kNN engine: faiss" in proc.stdout
    )  # faiss: [test] extra
    assert meta["extrapolation"]["spearman_held_out"] > 0.5  # neighbours predict held-out scores (0.93 measured)
    assert len(os.listdir(tmp_path / "scores/history")) == 6
    du = np.load(tmp_path / "scores/du.npy")
    keep = np.load(tmp_path / "selection/keep.npy")
    assert du.shape == keep.shape == (3528,) and np.isnan(du).sum() == 32  # only the validation slice is unscored
    synthetic = np.arange(3528) >= 1528
    assert keep[:1528].sum() == 1528 - 32  # originals kept whole (scope 'synthetic')
    assert keep[synthetic].sum() == 1000  # half of the 2,000 synthetic rows
    assert du[synthetic & keep].mean() > du[synthetic & ~keep].mean()  # the high-uncertainty half is kept


EMBEDDING_CONFIG = """
from configs import default as _default  # a config of one's own builds on the shipped ones


def get_config():
    c = _default.get_config("smoke")
    c.model.kwargs.widths = (8, 16, 32)  # the scoring model: 32 features
    s = c.scoring
    s.score, s.history_protocol, s.history_early_stop, s.train_epochs, s.du_window = "du", "reference", 1, 6.0, 2
    e = s.extrapolation
    e.enabled, e.subset_size = True, 300
    e.embedding_from = {embedding!r}  # the smoke run's model: 64 features
    e.embedding_model = "small_cnn"
    e.embedding_kwargs = dict(widths=(16, 32, 64), mean=(0.5,), std=(0.25,))
    c.pruning.strategy, c.pruning.scope = "keep_top", "synthetic"
    return c
"""


def test_reference_history_protocol_scores_the_subset_alone_once_per_pass_in_another_models_embedding(
    smoke_run, tmp_path
):
    """scoring.history_protocol='reference': the synthetic subset trains alone (plain epochs of ceil(300 / 64) = 5 steps,
    a record after each, early stopping); the originals are not scored (scope 'synthetic'); the kNN runs in the
    penultimate features of other weights (embedding_from, another model), not the scoring model's."""
    config = tmp_path / "embedding.py"
    config.write_text(EMBEDDING_CONFIG.format(embedding=str(smoke_run[0])))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jax_advprune.main",
            "--config",
            str(config),
            "--workdir",
            str(tmp_path / "run"),
            "--phases=score,select",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    meta = json.load(open(tmp_path / "run/scores/meta.json"))
    assert meta["scored"] == 300 and list(meta["history_runs"]) == ["synthetic"]  # no originals run
    run = meta["history_runs"]["synthetic"]
    assert run["rows"] == 300 and run["steps_per_record"] == 5
    assert (
        2 <= run["records"] <= 6 and run["steps"] == 5 * run["records"]
    )  # one record per full pass; early stopping may end it
    assert sorted(os.listdir(tmp_path / "run/scores/history/synthetic")) == [
        f"epoch_{k:05d}.npz" for k in range(1, run["records"] + 1)
    ]
    if run["records"] < 6:
        assert "[score/train_synthetic] stopped early" in proc.stdout
    assert meta["extrapolation"]["embedding"] == str(smoke_run[0]) and meta["extrapolation"]["embedding_dim"] == 64
    keep = np.load(tmp_path / "run/selection/keep.npy")
    assert keep[:1528].sum() == 1528 - 32 and keep[1528:].sum() == 1000  # originals kept whole, half the synthetic rows


def test_el2n_over_two_scoring_models_feeds_keep_bottom(tmp_path):
    proc = run_main(
        tmp_path,
        "--config.scoring.score=el2n",
        "--config.scoring.num_models=2",
        "--config.scoring.train_epochs=1",
        "--config.pruning.strategy=keep_bottom",
        "--config.pruning.keep_ratio=0.25",
        "--config.eval.attack=pgd",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    meta = json.load(open(tmp_path / "scores/meta.json"))
    assert meta["score"] == "el2n" and len(meta["model_checkpoints"]) == 2
    el2n = np.load(tmp_path / "scores/el2n.npy")
    keep = np.load(tmp_path / "selection/keep.npy")
    scored = np.isfinite(el2n)
    assert scored.sum() == 3528 - 32 and np.all((el2n[scored] >= 0) & (el2n[scored] <= np.sqrt(2) + 1e-6))
    assert keep.sum() == round(0.25 * (3528 - 32))
    assert el2n[keep].max() <= el2n[scored & ~keep].min()  # the easiest quarter is kept


@pytest.mark.parametrize("devices,mesh", [(1, 1)])
def test_the_smoke_command_finishes_on_any_number_of_cpu_devices(tmp_path, devices, mesh):
    """The README's command with N virtual CPU devices (as on an N/2-core host): the mesh spans the largest
    count that divides the smoke config's batches of 64 and 256, slots 256 and chunks of 4096; every phase
    runs (a shorter schedule than the smoke's own, the same code paths). With the paper configs' smoke
    variants on 3 and 24 devices (above, where the mesh spans fewer devices than exist), the 4-device smoke
    run and the one-process runs on 4 and 8 devices of test_multihost, the counts 1, 3, 4, 8 and 24. (48 devices,
    a mesh of 32, ran here until the suite's time needed its 40 s for the AutoAttack checks.)"""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = main_command(
        tmp_path / "run",
        "--config.train.epochs=0.5",
        "--config.scoring.train_epochs=0.5",
        "--config.train.validation_every_epochs=0.5",
        "--config.eval.apgd_steps=2",
        "--config.eval.weights=('ema', 'best_ema')",
    )
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.load(open(tmp_path / "run" / "results.json"))
    assert set(results["results"]) == {"ema", "best_ema"}  # eval.weights: only what is asked for is evaluated
    assert results["devices"]["count"] == mesh
    if mesh < devices:
        assert f"the mesh spans {mesh} of the {devices} cpu devices" in proc.stdout
    for r in results["results"].values():
        assert 0.0 <= r["pgd_accuracy"] <= r["clean_accuracy"] <= 1.0
