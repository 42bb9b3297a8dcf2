"""Robust accuracy of each AutoAttack component and of standard AutoAttack, ours against torchattacks, on the same
weights and the same samples.

    python benchmarks/autoattack_agreement.py [--side 32] [--samples 512] [--steps 10] [--queries 300]

The model is one a user writes without the project's layers: a plain `lax.conv` CNN (conv 3x3 (8) relu, conv 3x3
stride 2 (16) relu, dense), trained here for 150 Adam steps on class templates plus noise, and the same network
written in PyTorch with the weights copied (outputs checked equal to 1e-4). Each component runs at torchattacks'
settings on both sides (`--steps` iterations for APGD-CE, APGD-T and FAB-T, `--queries` for Square); the whole
standard AutoAttack runs at torchattacks' 'standard' settings (10 iterations for APGD and FAB, 5,000 Square
queries). A sample counts as robust when its adversarial point is classified correctly or lies outside the eps-ball,
checked here, independently of either library. Both sides measure the same samples, so their difference is judged
against 3 binomial standard errors (`within_noise`).

Each norm's eps is the 40th percentile (--eps-percentile) of the correctly classified samples' DeepFool distances,
rounded, so that the attacks break some samples and not others. Writes benchmarks/results/autoattack_agreement.json
(per norm: eps, clean accuracy, where eps falls among those distances, and per attack ours, torchattacks and whether
they agree within noise), from which
`python benchmarks/tables.py` renders the tables of docs/attacks.md. No figure here is a timing; the seconds each
side took are recorded for information only. tests/test_autoattack.py runs the same comparison on 16x16 images.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # both sides on the CPU; an installed libtpu is not probed for chips

import hygiene  # noqa: E402

CLASSES = 10
EPS = {"linf": 3 / 255, "l2": 0.25}  # tests/test_autoattack.py's, on 16x16 images
TORCH_NORM = {"linf": "Linf", "l2": "L2"}
TRAIN_STEPS, TRAIN_BATCH = 150, 128


def plain_cnn(params, x):
    """(B, S, S, 3) in [0, 1] -> (B, 10) logits: conv 3x3 (8) relu, conv 3x3 stride 2 (16) relu, dense (S even)."""
    import jax

    dn = ("NHWC", "HWIO", "NHWC")
    h = jax.nn.relu(jax.lax.conv_general_dilated(x, params["c1"], (1, 1), "SAME", dimension_numbers=dn) + params["b1"])
    h = jax.nn.relu(
        jax.lax.conv_general_dilated(h, params["c2"], (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn) + params["b2"]
    )
    return h.reshape(h.shape[0], -1) @ params["w"] + params["b"]


def torch_twin(params, side: int):
    """The same network in PyTorch (NCHW inside, NHWC flatten order), weights copied from `params`."""
    import numpy as np
    import torch

    nn = torch.nn

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.fc = nn.Linear(16 * (side // 2) ** 2, CLASSES)

        def forward(self, x):
            h = torch.relu(self.c2(torch.relu(self.c1(x))))
            return self.fc(h.permute(0, 2, 3, 1).reshape(x.shape[0], -1))

    twin = Twin().eval()
    p = {k: np.asarray(v) for k, v in params.items()}
    with torch.no_grad():
        twin.c1.weight.copy_(torch.tensor(p["c1"].transpose(3, 2, 0, 1)))
        twin.c1.bias.copy_(torch.tensor(p["b1"]))
        twin.c2.weight.copy_(torch.tensor(p["c2"].transpose(3, 2, 0, 1)))
        twin.c2.bias.copy_(torch.tensor(p["b2"]))
        twin.fc.weight.copy_(torch.tensor(p["w"].T))
        twin.fc.bias.copy_(torch.tensor(p["b"]))
    return twin


def trained_plain_cnn(side: int, samples: int):
    """Trains plain_cnn on (side, side, 3) class templates plus Gaussian noise (std 0.2) -> (logits_fn as a Partial,
    torch twin, x (samples, side, side, 3) float32 in [0, 1], y (samples,) int32): fresh test samples, drawn after
    training, that the model mostly gets right. Deterministic (NumPy seed 0, JAX key 0)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import torch
    from jax.tree_util import Partial

    if side % 4:
        raise ValueError(f"side must be a multiple of 4, got {side}")
    rng = np.random.default_rng(0)
    cell = side // 4
    templates = 0.5 + rng.uniform(-0.06, 0.06, size=(CLASSES, 4, 4, 3)).repeat(cell, 1).repeat(cell, 2)

    def draw(n):
        y = rng.integers(0, CLASSES, n)
        x = np.clip(templates[y] + rng.normal(0, 0.2, (n, side, side, 3)), 0, 1)
        return x.astype(np.float32), y.astype(np.int32)

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    hidden = 16 * (side // 2) ** 2
    params = {
        "c1": jax.random.normal(keys[0], (3, 3, 3, 8)) * 0.3,
        "b1": jnp.zeros(8),
        "c2": jax.random.normal(keys[1], (3, 3, 8, 16)) * 0.15,
        "b2": jnp.zeros(16),
        "w": jax.random.normal(keys[2], (hidden, CLASSES)) * 0.03 * math.sqrt(1024 / hidden),
        "b": jnp.zeros(CLASSES),
    }
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt, x, y):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(plain_cnn(p, x), y).mean()  # noqa: E731
        updates, opt = tx.update(jax.grad(loss)(params), opt)
        return optax.apply_updates(params, updates), opt

    opt = tx.init(params)
    for _ in range(TRAIN_STEPS):
        params, opt = step(params, opt, *draw(TRAIN_BATCH))
    x, y = draw(samples)
    twin = torch_twin(params, side)
    with torch.no_grad():
        theirs = twin(torch.tensor(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(theirs, np.asarray(plain_cnn(params, x)), atol=1e-4)
    return Partial(plain_cnn, params), twin, x, y


def robust_accuracy(logits_fn, x, x_adv, y, eps: float, norm: str) -> float:
    """Fraction of samples whose x_adv (N, H, W, C) is outside the eps-ball around x or still classified y."""
    import jax.numpy as jnp
    import numpy as np

    from jax_advprune.attacks.common import flat_norm

    inside = np.asarray(flat_norm(jnp.asarray(x_adv - x), norm)) <= eps + 1e-5
    correct = np.asarray(jnp.argmax(logits_fn(jnp.asarray(x_adv)), -1)) == y
    return float(np.mean(correct | ~inside))


def torch_robust_accuracy(twin, attack, x, y, eps: float, norm: str) -> float:
    """robust_accuracy of a torchattacks attack's output on NHWC `x`, judged with the same rule."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    from jax_advprune.attacks.common import flat_norm

    nchw = torch.tensor(x).permute(0, 3, 1, 2).contiguous()
    adv = attack(nchw, torch.tensor(y, dtype=torch.long)).detach().permute(0, 2, 3, 1).numpy()
    with torch.no_grad():
        correct = twin(torch.tensor(adv).permute(0, 3, 1, 2)).argmax(1).numpy() == y
    inside = np.asarray(flat_norm(jnp.asarray(adv - x), norm)) <= eps + 1e-5
    return float(np.mean(correct | ~inside))


def within_noise(ours: float, theirs: float, n: int) -> bool:
    """Both measure the same n samples: allow 3 binomial standard errors of the larger spread, at least 2 samples."""
    p = max(min(ours, theirs), 1 / n)
    return abs(ours - theirs) <= max(3 * math.sqrt(p * (1 - p) / n), 2 / n)


def component_pairs(logits_fn, twin, x, y, eps: float, norm: str, steps: int, queries: int) -> dict:
    """Each AutoAttack component on both sides -> {name: (ours: callable () -> robust accuracy, theirs: same)}.

    Ours: the public attacks (APGD-T through `autoattack(version='custom')`, which runs its 9 target classes).
    Theirs: torchattacks.APGD(loss='ce'), APGDT, FAB(multi_targeted=True) and Square, at the same settings."""
    import jax
    import torchattacks

    from jax_advprune.attacks import apgd, autoattack, fab, square

    key, t = jax.random.PRNGKey(1), TORCH_NORM[norm]

    def ours(run):
        return lambda: robust_accuracy(logits_fn, x, run(), y, eps, norm)

    def theirs(attack):
        return lambda: torch_robust_accuracy(twin, attack, x, y, eps, norm)

    return {
        "APGD-CE": (
            ours(lambda: apgd(logits_fn, x, y, key, eps=eps, steps=steps, norm=norm)),
            theirs(torchattacks.APGD(twin, norm=t, eps=eps, steps=steps, loss="ce")),
        ),
        "APGD-T": (
            lambda: float(
                autoattack(
                    logits_fn, x, y, key, eps=eps, norm=norm, version="custom", attacks=["apgd-t"], apgd_steps=steps
                ).robust_accuracy[0]
            ),
            theirs(torchattacks.APGDT(twin, norm=t, eps=eps, steps=steps, n_classes=CLASSES)),
        ),
        "FAB-T": (
            ours(lambda: fab(logits_fn, x, y, key, eps=eps, norm=norm, steps=steps).x_adv),
            theirs(torchattacks.FAB(twin, norm=t, eps=eps, steps=steps, multi_targeted=True, n_classes=CLASSES)),
        ),
        "Square": (
            ours(lambda: square(logits_fn, x, y, key, eps=eps, norm=norm, queries=queries).x_adv),
            theirs(torchattacks.Square(twin, norm=t, eps=eps, n_queries=queries)),
        ),
    }


def standard_autoattack_pair(logits_fn, twin, x, y, eps: float, norm: str) -> tuple:
    """Standard AutoAttack at torchattacks' 'standard' settings (10 APGD and FAB iterations, 5,000 Square queries) ->
    (ours: callable () -> robust accuracy, theirs: same)."""
    import jax
    import torchattacks

    from jax_advprune.attacks import autoattack

    def ours():
        result = autoattack(
            logits_fn, x, y, jax.random.PRNGKey(2), eps=eps, norm=norm, apgd_steps=10, fab_steps=10, batch_size=len(y)
        )
        assert result.attacks == ("apgd-ce", "apgd-t", "fab-t", "square")
        measured = robust_accuracy(logits_fn, x, result.x_adv, y, eps, norm)
        assert abs(measured - float(result.robust_accuracy[-1])) < 1e-9, (measured, result.robust_accuracy)
        return measured

    theirs = torchattacks.AutoAttack(twin, norm=TORCH_NORM[norm], eps=eps, n_classes=CLASSES, seed=0)
    return ours, lambda: torch_robust_accuracy(twin, theirs, x, y, eps, norm)


def deepfool_distances(logits_fn, x, y, norm: str):
    """DeepFool distances (M,) of the correctly classified samples, in `norm`."""
    import jax.numpy as jnp
    import numpy as np

    from jax_advprune.attacks import deepfool

    correct = np.asarray(jnp.argmax(logits_fn(jnp.asarray(x)), -1)) == y
    return np.asarray(deepfool(logits_fn, x[correct], y[correct], norm=norm).distance)


def informative_eps(distances, norm: str, percentile: float) -> float:
    """The radius at `percentile` of the DeepFool distances, rounded: to a whole number of 1/255 (at least 1/255) for
    L-inf, to two significant digits for L2. Near the 40th percentile the attacks break some samples and not
    others, so robust accuracies lie well inside (0, clean) and a disagreement would show."""
    import numpy as np

    value = float(np.percentile(distances, percentile))
    if norm == "linf":
        return max(1, round(value * 255)) / 255
    return float(f"{value:.2g}")


def compare(logits_fn, twin, x, y, norm: str, eps: float, steps: int, queries: int, distances) -> dict:
    """Both sides of every component and of standard AutoAttack on (x, y) -> the norm's record; `distances`: the
    correctly classified samples' DeepFool distances in `norm`, to say where eps falls among them."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    clean = float(np.mean(np.asarray(jnp.argmax(logits_fn(jnp.asarray(x)), -1)) == y))
    pairs = component_pairs(logits_fn, twin, x, y, eps, norm, steps, queries)
    pairs["AutoAttack"] = standard_autoattack_pair(logits_fn, twin, x, y, eps, norm)
    rows = []
    for name, (ours, theirs) in pairs.items():
        torch.manual_seed(0)
        started = time.perf_counter()
        a = ours()
        middle = time.perf_counter()
        b = theirs()
        rows.append(
            {
                "attack": name,
                "ours": a,
                "torchattacks": b,
                "agree_within_noise": within_noise(a, b, len(y)),
                "seconds_ours": middle - started,
                "seconds_torchattacks": time.perf_counter() - middle,
            }
        )
        print(f"  {norm} {name:10s} ours {a:.3f}  torchattacks {b:.3f}  agree: {rows[-1]['agree_within_noise']}")
    return {
        "norm": norm,
        "eps": eps,
        "clean_accuracy": clean,
        "eps_percentile_of_deepfool_distances": float(100 * np.mean(distances <= eps)),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=32, help="image side (multiple of 4); 32 is CIFAR's")
    parser.add_argument("--samples", type=int, default=512, help="test samples both sides attack")
    parser.add_argument("--steps", type=int, default=10, help="APGD-CE, APGD-T and FAB-T iterations per component")
    parser.add_argument("--queries", type=int, default=300, help="Square's queries per component")
    parser.add_argument("--norms", default="linf,l2")
    parser.add_argument(
        "--eps-percentile",
        type=float,
        default=40.0,
        help="each norm's eps: this percentile of the clean samples' DeepFool distances, rounded",
    )
    parser.add_argument("--out", default="autoattack_agreement.json", help="file name in benchmarks/results/")
    args = parser.parse_args(argv)
    norms = args.norms.split(",")
    if unknown := set(norms) - set(EPS):
        raise SystemExit(f"--norms: unknown {sorted(unknown)}; choose from {sorted(EPS)}")
    import torch
    import torchattacks

    started = time.perf_counter()
    logits_fn, twin, x, y = trained_plain_cnn(args.side, args.samples)
    distances = {n: deepfool_distances(logits_fn, x, y, n) for n in norms}
    eps = {n: informative_eps(distances[n], n, args.eps_percentile) for n in norms}
    print("eps:", ", ".join(f"{n} {e:.4g}" for n, e in eps.items()))
    results = [compare(logits_fn, twin, x, y, n, eps[n], args.steps, args.queries, distances[n]) for n in norms]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {
        "benchmark": "autoattack_agreement",
        "command": " ".join(["python benchmarks/" + os.path.basename(__file__), *(argv or sys.argv[1:])]),
        "commit": commit,
        "model": f"plain lax.conv CNN (user's), {args.side}x{args.side}x3, trained {TRAIN_STEPS} Adam steps",
        "samples": args.samples,
        "steps": args.steps,
        "queries": args.queries,
        "eps_percentile": args.eps_percentile,
        "cpu": hygiene.cpu_record("native"),
        "machine": hygiene.machine_record(
            sorted(os.sched_getaffinity(0)), torch=torch.__version__, torchattacks=torchattacks.__version__
        ),
        "seconds": time.perf_counter() - started,
        "results": results,
    }
    print("wrote", hygiene.write_results(args.out, record))
    disagree = [f"{r['norm']} {row['attack']}" for r in results for row in r["rows"] if not row["agree_within_noise"]]
    if disagree:
        print("NOT within noise:", ", ".join(disagree))
    return 1 if disagree else 0


if __name__ == "__main__":
    raise SystemExit(main())
