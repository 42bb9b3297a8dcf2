"""The reference recipe (Wang et al. 2023, DM-Improves-AT): TRADES WRN-28-10 Swish on CIFAR-10 + generated data.

Command (one GPU or a pod; the same line on every host of a multi-host run, with
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set, or under SLURM
with --distributed=on):

    python -m jax_advprune.main --config configs/cifar10_trades.py --workdir runs/c10_trades \\
      --config.data.tarball=/data/cifar-10-python.tar.gz \\
      --config.data.synthetic='("/data/20m_part1.npz", "/data/20m_part2.npz", ...)'

Settings (docs/algorithms.md, section 5): WRN-28-10 with Swish,
TRADES beta 5 with the attack on KL, L-inf eps 8/255, 10 steps of 2/255, batch 512
with 30% original / 70% generated images (generated drawn with replacement), an
epoch = ceil(50,000 / 512) = 98 steps, 400 epochs, SGD Nesterov, lr 0.2 on the
reference's schedule (torch's OneCycleLR stepped once per epoch: cosine warm-up from
lr/25 over the first 2.5% of epochs, cosine down to lr/25/1e4, momentum cycled
0.95 -> 0.85 -> 0.95), weight decay 5e-4 (not on BatchNorm or biases), label
smoothing 0.1, EMA 0.995 with the reference's dynamic decay from update 0.025 x
39,200 = 980 on, BatchNorm averages set to the first update's batch statistics (its
momentum 1.0 there), random crop (padding 4) and flip; model selection by PGD-40 on the
CW loss, accuracy of the EMA weights on 1,024 held-out training images. No pruning here (keep everything);
configs/cifar10_puma.py and cifar10_extrapolation.py build on this.

Expected result (reported by the reference, 20M generated images, 400 epochs,
AutoAttack on the 10k test images): 92.44% clean, 67.31% robust. Our evaluator is
the standard AutoAttack (APGD-CE, APGD-T with 9 targets, FAB-T, Square 5,000
queries), run on the samples each earlier component left robust.
Differences from the reference we know of (DM-Improves-AT at bbdeb4f) are in the
table of docs/algorithms.md ("Differences from the reference code"), with file:line.

Expected wall time: not measured by this project (it needs accelerators). Estimate
it before renting them: `python -m jax_advprune.plan --config configs/cifar10_trades.py
--topology v5e:2x4` compiles the step for that TPU topology on a CPU host and gives
the hours at roofline and at a stated utilisation.

Smoke variant (runs offline on a 2-core CPU in about a minute: a WRN-10-1 on a
generated 32x32x3 data set; it checks that the recipe runs, its accuracies are
near chance):

    python -m jax_advprune.main --config configs/cifar10_trades.py:smoke --workdir runs/c10_smoke
"""

from configs import default as _default

EPOCH_STEPS = -(-50_000 // 512)  # 98


def get_config(arg: str | None = None):
    c = _default.get_config()
    c.data.name = "cifar_tarball"
    c.data.tarball = "cifar-10-python.tar.gz"
    c.data.num_classes = 10

    c.model.name = "wrn28_10"
    c.model.kwargs = {"activation": "swish"}  # CIFAR-10 mean/std are the model's defaults

    c.attack.norm = "linf"
    c.attack.eps = 8 / 255
    c.attack.step_size = 2 / 255
    c.attack.steps = 10

    t = c.train
    t.loss = "trades"
    t.trades_beta = 5.0
    t.epochs = 400.0
    t.batch_size = 512
    t.original_fraction = 0.3
    t.synthetic_with_replacement = True
    t.lr = 0.2
    t.schedule = "onecycle"  # the reference's 'cosinew': OneCycleLR per epoch, momentum cycled
    t.onecycle_pct_start = 0.025
    t.momentum = 0.9  # unused by 'onecycle' (--config.train.schedule=warmup_cosine uses it)
    t.nesterov = True
    t.weight_decay = 5e-4
    t.warmup_steps = int(0.025 * 400 * EPOCH_STEPS)  # 'warmup_cosine' only
    t.label_smoothing = 0.1
    t.ema_decay = 0.995
    t.ema_warmup_steps = 0
    t.ema_start_fraction = 0.025  # the reference's warmup_steps = 0.025 x epochs x steps per epoch (980)
    t.first_step_batch_stats = True  # the reference's BatchNorm momentum 1.0 on the first update
    t.crop_padding = 4
    t.flip = True
    t.num_workers = 2
    t.checkpoint_every = EPOCH_STEPS * 5
    t.keep_checkpoints = 2
    t.validation_size = 1024
    t.validation_every_epochs = 1.0
    t.validation_pgd_steps = 40
    t.validation_loss = "cw"  # the reference selects by PGD-40 on its CWLoss
    t.log_every_steps = 50
    t.log_every_s = 60.0

    c.pruning.strategy = "random"
    c.pruning.keep_ratio = 1.0

    c.eval.pgd_steps = 40
    c.eval.batch_size = 512
    c.eval.attack = "autoattack"  # standard AutoAttack, as the papers report
    c.eval.apgd_steps = 100
    c.eval.apgd_targets = 9
    c.eval.fab_steps = 100
    c.eval.square_queries = 5000

    if arg == "smoke":
        c.data.name = "generated"
        c.data.generated_sizes = (512, 128, 1024)
        c.model.name = "wide_resnet"
        c.model.kwargs = {"depth": 10, "width": 1, "activation": "swish"}
        c.attack.steps = 2
        c.attack.step_size = 4 / 255
        t.epochs = 2.0
        t.batch_size = 64
        t.warmup_steps = 2
        t.num_workers = 0
        t.checkpoint_every = 8
        t.validation_size = 64
        t.validation_every_epochs = 1.0
        t.validation_pgd_steps = 2
        t.log_every_steps = 4
        t.log_every_s = 5.0
        c.eval.pgd_steps = 2
        c.eval.batch_size = 64
        c.eval.apgd_steps = 5
        c.eval.apgd_targets = 1
        c.eval.fab_steps = 3
        c.eval.square_queries = 20
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; known: 'smoke'")
    return c
