"""Data importance extrapolation (Nieth et al., arXiv 2406.13283) on CIFAR-10 + a generated pool.

Command (paths are flags; one GPU or a pod, see configs/cifar10_trades.py):

    python -m jax_advprune.main --config configs/cifar10_extrapolation.py --workdir runs/c10_extra \\
      --config.data.tarball=/data/cifar-10-python.tar.gz \\
      --config.data.synthetic='("/data/1m.npz",)' --config.pruning.keep_ratio=0.5

Setup (docs/algorithms.md, sections 3 and 4), as the reference code does it
(LS-Dataset-pruning-in-AT at 552f1c1; the differences that remain are in the table
of docs/algorithms.md): a TRADES scoring run on a 100k-image subset of the
generated pool alone, and one on the original training set alone (the reference's
protocol, scoring.history_protocol='reference'), each of up to 400 epochs on the
recipe's schedule, stopped after 30 validations without a better robust accuracy
(its README's --epochs=400 --early-stop-diff=30), recording after every full pass
the true-class probability on PGD-10 inputs (L-inf 8/255, step 2/255, random
start); dynamic uncertainty (window 10) of that history scores both sets; every
other pool image gets the unweighted mean score of its k = 12 nearest scored
images, originals included (Euclidean on L2-normalised embeddings, as SSCD's are),
in the embedding of the scoring model's penultimate features (the paper uses an
SSCD copy-detection network; scoring.extrapolation.embedding_from takes any other
model's weights). The lowest-scoring synthetic images are pruned (keep_top,
without class balance, as in the reference README's example); the original
training set is kept whole. Batches are 20% original / 80% synthetic; an epoch is
ceil(50,000 / 512) batches. The final model follows configs/cifar10_trades.py.
Every scored image is a kNN reference; `python -m jax_advprune.check_extrapolation
--workdir <dir>` measures afterwards how well the kNN predicts computed scores
(Spearman on a held-out part, scores/extrapolation_check.json).

What the paper reports: extrapolated DU pruning matches or beats random pruning
(second-hand: about +0.5 points at 50% pruning), at the cost of scoring a small
subset instead of the pool.

Expected wall time: not measured by this project (accelerators; scoring runs of
up to 400 passes on 100k and on 50k images, then the 400-epoch recipe).

Smoke variant (runs offline on a 2-core CPU in about a minute; accuracies
near chance):

    python -m jax_advprune.main --config configs/cifar10_extrapolation.py:smoke --workdir runs/extra_smoke
"""

from configs import cifar10_trades as _trades


def get_config(arg: str | None = None):
    if arg not in (None, "smoke"):
        raise ValueError(f"unknown variant {arg!r}; known: 'smoke'")
    c = _trades.get_config(arg)
    c.train.original_fraction = 0.2
    s = c.scoring
    s.score = "du"
    s.du_window = 10 if arg is None else 2
    s.history_inputs = "pgd"
    s.history_protocol = "reference"  # the subset's history in a run on the subset alone, a record per full pass
    s.train_epochs = 400.0 if arg is None else 3.0  # the reference README's --epochs=400 --early-stop-diff=30
    s.history_early_stop = 30 if arg is None else 0
    s.use_ema = True
    s.chunk_size = 16384 if arg is None else 256
    e = s.extrapolation
    e.enabled = True
    e.subset_size = 100_000 if arg is None else 256
    e.seed = 0
    e.k = 12
    e.metric = "euclidean"
    e.weighting = "uniform"
    e.holdout_fraction = 0.0  # every scored row is a reference; python -m jax_advprune.check_extrapolation measures
    e.normalize = "l2"  # SSCD's embedding is L2-normalised (core/sscd/model.py), so the reference's kNN ranks by cosine
    e.original_references = True  # extrapolate.py's references: the scored originals and the scored subset
    p = c.pruning
    p.strategy = "keep_top"
    p.keep_ratio = 0.5
    p.scope = "synthetic"
    p.class_balanced = False  # optional in the reference (--keep-class-distribution); its README example: False
    return c
