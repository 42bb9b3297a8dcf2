"""PUMA (Maroto & Frossard, arXiv 2405.06298) on CIFAR-10 + a generated pool, on the reference recipe.

Command (paths are flags; one GPU or a pod, see configs/cifar10_trades.py):

    python -m jax_advprune.main --config configs/cifar10_puma.py --workdir runs/c10_puma \\
      --config.data.tarball=/data/cifar-10-python.tar.gz \\
      --config.data.synthetic='("/data/1m.npz",)' --config.pruning.keep_ratio=0.5

Setup: the recipe of configs/cifar10_trades.py (WRN-28-10 Swish, TRADES beta 5,
L-inf 8/255, batch 512, 30% originals, EMA, 400 epochs) trains on the selection.
Scores: a margin model (the same recipe, 100 epochs here: our choice, the paper
gives no number we have) is adversarially trained on the whole pool, and DeepFool
L-inf margins (50 iterations, overshoot 0.02, all 10 candidate classes) are
computed on clean inputs for every pool sample, in the form of DM-Improves-AT's
DeepFoolAttack (overshoot and clipping, then a 50-step bisection towards the
boundary; the margin is the distance of the point it returns). PUMA keeps the `keep_ratio`
lowest-margin samples of the synthetic pool (the original training set is kept
whole; set pruning.scope='all' to prune it too) and lowers the training eps of
kept samples whose margin is below 8/255 to their margin (eps_min 0). Which parts
of this rule are our reading: docs/algorithms.md, sections 1 and 2.

With a pretrained robust model (the paper's setting; e.g. a RobustBench or
DM-Improves-AT WRN-28-10 checkpoint), add --config.scoring.init_from=PATH: margins
come from it and no margin model is trained (README "Use with PyTorch").

What the paper reports (abstract): PUMA improves the accuracy/robustness
trade-off over prune-easy, prune-hard and random pruning at the same data budget,
where those rules do not; no number of the body is available to us.

Expected wall time: not measured by this project (accelerators; a 100-epoch
margin model, DeepFool over the pool, then the 400-epoch recipe).

Smoke variant (runs offline on a 2-core CPU in about two minutes; accuracies
near chance):

    python -m jax_advprune.main --config configs/cifar10_puma.py:smoke --workdir runs/puma_smoke
"""

from configs import cifar10_trades as _trades


def get_config(arg: str | None = None):
    if arg not in (None, "smoke"):
        raise ValueError(f"unknown variant {arg!r}; known: 'smoke'")
    c = _trades.get_config(arg)
    s = c.scoring
    s.score = "margin"
    s.train_epochs = 100.0 if arg is None else 2.0
    s.use_ema = True
    s.slots = 512 if arg is None else 64
    s.chunk_size = 16384 if arg is None else 512
    s.deepfool.norm = "linf"
    s.deepfool.max_iter = 50 if arg is None else 10
    s.deepfool.overshoot = 0.02
    s.deepfool.candidates = 0  # all classes, as the paper's DeepFool
    # DM-Improves-AT's DeepFoolAttack, the code base PUMA builds on: step slack 1e-6, 50 halvings towards the
    # clipped point, the distance of the returned point (docs/algorithms.md, section 1).
    s.deepfool.form = "dm_improves_at"
    s.deepfool.search_steps = 50
    p = c.pruning
    p.strategy = "puma"
    p.keep_ratio = 0.5
    p.scope = "synthetic"
    p.class_balanced = False
    p.puma.rule = "below_eps"
    p.puma.scale = 1.0
    p.puma.eps_min = 0.0
    p.puma.misclassified = "eps_min"  # or 'eps_zero', 'drop' (README "PUMA: which parts are our reading")
    return c
