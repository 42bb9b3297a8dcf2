"""The fast tier's end-to-end check: the README's command on a tiny schedule (every phase, in a child process, as a
user runs it), then both exports of what it made. The slow tier runs the full smoke schedule and much more."""

import json
import subprocess
import sys

import numpy as np
import torch
from conftest import REPO, main_command

TINY = (
    "--config.train.epochs=0.5",
    "--config.scoring.train_epochs=0.5",
    "--config.train.validation_every_epochs=0.5",
    "--config.data.synthetic_size=300",
    "--config.scoring.deepfool.max_iter=4",
    "--config.eval.pgd_steps=1",
    "--config.eval.attack=pgd",
)


def _run_module(module: str, *args: str) -> None:
    """`python -m module args` as a user runs it; fails the test with its stderr unless it exits 0."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_tiny_run_of_every_phase_then_the_model_and_the_selection_exported(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run(main_command(workdir, *TINY), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.load(open(workdir / "results.json"))
    selection = json.load(open(workdir / "selection" / "meta.json"))
    assert results["pool_size"] == 1528 + 300 and selection["kept"] == results["kept"]
    for accuracies in results["results"].values():
        assert 0.0 <= accuracies["pgd_accuracy"] <= accuracies["clean_accuracy"] <= 1.0
    margins = np.load(workdir / "scores" / "margin.npy")
    assert margins.shape == (1528 + 300,) and np.isfinite(margins[~np.isnan(margins)]).all()

    model = tmp_path / "model.pt"
    _run_module("jax_advprune.export", "--workdir", str(workdir), "--out", str(model))
    state = torch.load(model, weights_only=True)
    assert state and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())

    out = tmp_path / "kept"
    _run_module("jax_advprune.export_selection", "--workdir", str(workdir), "--out", str(out))
    summary = json.load(open(out / "selection.json"))
    keep = np.load(workdir / "selection" / "keep.npy")
    assert summary["rows"] == int(keep[1528:].sum())  # the kept synthetic rows, all of them, in one part
    (part,) = summary["parts"]
    rows = np.load(out / part["pool_index"])
    generated = np.load(workdir / "data" / "synthetic.npz")["image"]
    np.testing.assert_array_equal(
        np.load(out / part["images"])["image"], generated[rows - 1528]
    )  # the pool's own bytes
