"""The embedded default: PUMA on real digits plus a generated pool, offline, on a CPU.

Command (2 CPU cores, measured 87 s on an idle machine; no download):

    python -m jax_advprune.main --config configs/default.py --workdir runs/default

Expected result (seed 0, EMA weights on the 269 test images, standard error about
2.5 points each), on an AVX-512 host (oneDNN convolutions): clean 97.0%, PGD-20
77.3%, APGD-CE 77.0%, APGD-CE + APGD-T 74.0%; 10,700 of 21,400 pool samples kept,
5,864 of them with a lowered eps. On an AVX2 host (XLA's convolutions, summing in
another order): 97.4%, 78.1%, 77.7%, 74.7%, 5,886. `report.md` in the work
directory holds the table with each accuracy's standard error; docs/runs.md
compares it with random pruning and the full pool, and
`python benchmarks/embedded_default.py` re-measures all three.

Smoke variant (what the tests run; 2 CPU cores, measured 24 s):

    python -m jax_advprune.main --config configs/default.py:smoke --workdir runs/smoke

Expected smoke result: it finishes; the tiny schedule (2 epochs) gives about 48%
clean and 10% PGD-5 accuracy, far from converged (tests/test_smoke_figures.py pins
the figures per CPU route).

Data: scikit-learn's 1,797 handwritten digits, bilinearly resized to 16x16x1
uint8 and split per class into 1,528 train / 269 test images, plus a pool of
20,000 images sampled from per-class Gaussian mixtures fitted in a PCA space of
the train split (see jax_advprune/data/generate.py), written once as npz files
into <workdir>/data in the DM-Improves-AT format.

Phases: a small CNN is PGD-AT trained on the whole pool (L-inf eps 0.05, 10 steps)
and DeepFool L-inf margins are computed for every pool sample; PUMA keeps the
50% lowest-margin samples and lowers the training eps of kept samples whose
margin is below eps; a fresh model is PGD-AT trained on the selection and
evaluated (clean, PGD-20, APGD-CE and APGD-T) on the test split.

Any field can be overridden: --config.pruning.keep_ratio=0.75
--config.pruning.strategy=random --config.train.epochs=10 ...; every setting is
checked before anything runs.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Devices of the data mesh; 0 = automatic: every GPU or TPU, or on a CPU (two virtual devices per core, --cpu_devices)
    # the largest count that divides every batch, slot and chunk size.
    c.num_devices = 0

    c.data = ml_collections.ConfigDict()
    c.data.name = (
        "digits"  # 'digits' (embedded), 'npz' (DM-Improves-AT files), 'cifar_tarball' or 'tfds'; README "Data"
    )
    c.data.num_classes = 10
    c.data.image_size = 16  # digits only
    c.data.synthetic_size = 20_000  # digits only
    c.data.test_fraction = 0.15  # digits only
    c.data.seed = 0  # digits only: split and generator seed
    c.data.original = ""  # npz only: original training split
    c.data.test = ""  # npz only: test split
    c.data.tarball = ""  # cifar_tarball only: cifar-10-python.tar.gz or cifar-100-python.tar.gz
    # A local directory: remote (gs://) data files are copied there once per host and read from the copy
    # ('' = read them remotely, batch by batch); cifar_tarball writes its converted npz files there ('' = <workdir>/data).
    c.data.cache_dir = ""
    c.data.tfds_name = "cifar10"  # tfds only: cifar10 | cifar100 | svhn_cropped
    c.data.tfds_data_dir = ""  # tfds only: prepared array_record data ('' = TFDS default)
    c.data.generated_sizes = (0, 0, 0)  # generated only: train, test, synthetic images
    c.data.generated_image_shape = (32, 32, 3)  # generated only
    c.data.synthetic = ()  # synthetic npz parts appended to the pool, read in order

    c.model = ml_collections.ConfigDict()
    c.model.name = "small_cnn"
    c.model.kwargs = ml_collections.ConfigDict({"widths": (16, 32, 64), "mean": (0.5,), "std": (0.25,)})

    # The training attack (also the threat model of the evaluation).
    c.attack = ml_collections.ConfigDict()
    c.attack.norm = "linf"
    c.attack.eps = 0.05
    c.attack.step_size = 0.0125  # scaled per sample by eps_i / eps
    c.attack.steps = 10

    c.train = ml_collections.ConfigDict()
    c.train.loss = "pgd_at"  # 'pgd_at' (Madry) or 'trades' (KL attack, CE + beta * KL)
    c.train.init_from = ""  # start from these weights (same kinds of path as scoring.init_from); '' = fresh
    c.train.trades_beta = 6.0  # trades only
    c.train.compute_dtype = "float32"  # or 'bfloat16' (parameters stay float32)
    c.train.epochs = 40.0  # an epoch is ceil(len(original split) / batch_size) steps: 12 here
    c.train.batch_size = 128
    c.train.original_fraction = 0.3  # originals per batch; 0 = plain epochs over the kept pool
    c.train.synthetic_with_replacement = True
    c.train.lr = 0.1
    c.train.momentum = 0.9
    c.train.nesterov = True
    c.train.weight_decay = 5e-4
    c.train.warmup_steps = 50
    # 'warmup_cosine': linear warm-up over warmup_steps, cosine to 0, per step. 'onecycle': DM-Improves-AT's
    # 'cosinew', torch's OneCycleLR stepped per epoch (cosine warm-up from lr/25 over onecycle_pct_start of the
    # epochs, cosine down to lr/25/1e4) with momentum cycled 0.95 -> 0.85 -> 0.95 (momentum is then unused).
    c.train.schedule = "warmup_cosine"
    c.train.onecycle_pct_start = 0.025
    c.train.label_smoothing = 0.1
    c.train.ema_decay = 0.995
    c.train.ema_warmup_steps = 0
    # > 0: DM-Improves-AT's EMA start instead, at update fraction x total steps (its 0.025), with its decay rule.
    c.train.ema_start_fraction = 0.0
    # True: BatchNorm averages after the first step are that step's batch statistics (the reference's momentum 1.0
    # on its first update); False: the model's momentum from the first step on.
    c.train.first_step_batch_stats = False
    c.train.crop_padding = 2
    c.train.flip = False  # digits are not mirror-symmetric
    c.train.num_workers = 0
    # Model selection as in the reference: PGD accuracy of the EMA weights on originals
    # held out of training; the best checkpoint is kept in checkpoints_best/.
    c.train.validation_size = 128
    c.train.validation_every_epochs = 5.0
    c.train.validation_pgd_steps = 10
    c.train.validation_loss = "ce"  # the model-selection PGD's loss: 'ce', or 'cw' (DM-Improves-AT's CWLoss)
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 2
    c.train.log_every_steps = 25
    c.train.log_every_s = 10.0

    c.scoring = ml_collections.ConfigDict()
    c.scoring.score = "margin"  # margin | el2n | grand | forgetting | du | fp | random
    # Score with given weights instead of training a scoring model (margin, el2n, grand): a PyTorch or
    # .safetensors checkpoint with the reference keys (model.kwargs must describe it), a jax_advprune work
    # directory (its best EMA weights) or one of its checkpoints (README "Use with PyTorch").
    c.scoring.init_from = ""
    c.scoring.train_epochs = 25.0  # the scoring model: adversarial training on the scored rows
    c.scoring.num_models = 2  # el2n / grand: scores averaged over this many seeds
    c.scoring.history_inputs = (
        "clean"  # forgetting / du / fp: true-class probability on 'clean' or 'pgd' inputs, every epoch
    )
    # forgetting / du / fp: 'mixed' (one run, originals + scored synthetic rows mixed as in training, a record per
    # epoch of ceil(originals / batch) steps) or 'reference' (Nieth et al.'s code: a run per group on that group
    # alone, originals and synthetic rows apart, a record per full pass); README "Pruning: scores, ..."
    c.scoring.history_protocol = "mixed"
    c.scoring.history_early_stop = 0  # stop a history run after this many validations without a better one (0 = never)
    c.scoring.du_window = 10  # du: window J
    c.scoring.extrapolation = ml_collections.ConfigDict()
    c.scoring.extrapolation.enabled = False  # score a subset, kNN-extrapolate to the rest (Nieth et al.)
    c.scoring.extrapolation.subset_size = 2000  # synthetic rows scored (originals are always scored)
    c.scoring.extrapolation.seed = 0
    c.scoring.extrapolation.k = 12
    c.scoring.extrapolation.metric = "euclidean"  # or 'cosine'
    c.scoring.extrapolation.weighting = "uniform"  # or 'distance'
    c.scoring.extrapolation.holdout_fraction = 0.1  # scored rows kept out of the references, to measure Spearman
    # 'l2': unit-length embeddings before the kNN (SSCD's output is L2-normalised, so the reference's Euclidean
    # kNN ranks like cosine); 'none': the features as they come.
    c.scoring.extrapolation.normalize = "none"
    # With history_protocol='reference' and pruning.scope='synthetic' the originals are not scored; True scores them
    # (their own history run, as the reference does) and makes them kNN references; they stay unprunable.
    c.scoring.extrapolation.original_references = False
    c.scoring.extrapolation.engine = "auto"  # exact kNN: 'auto' (faiss when installed, on a CPU), 'faiss' or 'jax'
    # The kNN's embedding: '' = the scoring model's penultimate features; or weights (same kinds of path as
    # scoring.init_from) whose penultimate features embed every row (the paper uses SSCD, a copy-detection network).
    c.scoring.extrapolation.embedding_from = ""
    c.scoring.extrapolation.embedding_model = ""  # embedding_from's model name ('' = model.name with model.kwargs)
    c.scoring.extrapolation.embedding_kwargs = ml_collections.ConfigDict()  # its kwargs, with embedding_model
    c.scoring.use_ema = True
    c.scoring.slots = 256  # samples per DeepFool iteration (the work queue's width)
    c.scoring.chunk_size = 4096  # samples per device call; the queue refills slots within a chunk
    c.scoring.deepfool = ml_collections.ConfigDict()
    c.scoring.deepfool.norm = "linf"  # must match attack.norm for puma
    c.scoring.deepfool.max_iter = 50
    c.scoring.deepfool.overshoot = 0.02
    # Top-3 classes by logit instead of all 10: several times faster on the CPU, median distance
    # unchanged (README "Performance"); 0 = all classes (--config.scoring.deepfool.candidates=0).
    c.scoring.deepfool.candidates = 3
    # 'foolbox': distance ||r_total||; 'dm_improves_at': DM-Improves-AT's DeepFoolAttack (slack 1e-6, then
    # `search_steps` halvings towards the clipped point, distance of the returned point). docs/algorithms.md.
    c.scoring.deepfool.form = "foolbox"
    c.scoring.deepfool.search_steps = 50

    c.pruning = ml_collections.ConfigDict()
    c.pruning.strategy = (
        "puma"  # random | prune_easy | prune_hard | puma (margins) | keep_top | keep_bottom (any score)
    )
    c.pruning.keep_ratio = 0.5
    c.pruning.scope = "all"  # 'all' or 'synthetic' (originals always kept)
    c.pruning.class_balanced = False
    c.pruning.puma = ml_collections.ConfigDict()
    c.pruning.puma.rule = "below_eps"  # or 'low_fraction'
    c.pruning.puma.scale = 1.0
    c.pruning.puma.eps_min = 0.0
    c.pruning.puma.low_fraction = 0.1
    # Kept samples the margin model misclassifies (margin <= 0): 'eps_min', 'eps_zero' (clean training) or 'drop'.
    c.pruning.puma.misclassified = "eps_min"

    c.eval = ml_collections.ConfigDict()
    c.eval.init_from = ""  # evaluate these weights (with --phases=evaluate) instead of the train phase's
    c.eval.pgd_steps = 20
    c.eval.step_fraction = 0.25  # PGD step = eps * step_fraction
    c.eval.batch_size = 256
    c.eval.attack = "autoattack_lite"  # besides PGD: 'pgd' (nothing more), 'autoattack_lite' (APGD-CE, APGD-T), 'autoattack' (standard)
    c.eval.apgd_steps = 100  # iterations of APGD-CE and APGD-T
    c.eval.apgd_targets = 3  # target classes of APGD-T and FAB-T (AutoAttack standard: 9)
    c.eval.fab_steps = 100  # FAB-T iterations (eval.attack='autoattack')
    c.eval.square_queries = 5000  # Square Attack budget per sample (eval.attack='autoattack')
    # digits only: > 0 also evaluates on this many images drawn from the pool's generator with a disjoint seed (never
    # trained on), reported beside the real test split, never instead of it: samples of the generator, not real data.
    c.eval.generated_test_size = 0
    # Which weights of the train phase are evaluated: the final raw and EMA weights and the best-validation EMA
    # weights (AutoAttack on a large split costs minutes per set of weights; evaluate what you report).
    c.eval.weights = ("raw", "ema", "best_ema")

    if arg == "smoke":
        c.data.synthetic_size = 2_000
        c.train.epochs = 2.0
        c.train.batch_size = 64
        c.train.warmup_steps = 5
        c.train.checkpoint_every = 20
        c.train.log_every_steps = 10
        c.train.log_every_s = 5.0
        c.train.validation_size = 32
        c.train.validation_every_epochs = 1.0
        c.train.validation_pgd_steps = 2
        c.scoring.train_epochs = 2.0
        c.attack.steps = 3
        c.attack.step_size = 0.025
        c.scoring.deepfool.max_iter = 10
        c.eval.pgd_steps = 5
        c.eval.apgd_steps = 10
        c.eval.apgd_targets = 1
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; known: 'smoke'")
    return c
