"""Attack throughput on CIFAR shapes: jax_advprune's public attacks vs torchattacks and foolbox, same weights, one run.

    pip install -e ".[bench]"
    python benchmarks/attacks.py [--batch 256] [--resnet-batch 32] [--aa-batch 64] [--devices 4] [--threads 2] [--repeats 3]
                                 [--models small_cnn,plain_cnn,preact_resnet18,wrn_16_4] [--autoattack-models small_cnn,plain_cnn]
                                 [--autoattack-only] [--out attacks.json] [--allow-busy]

Every model takes 32x32x3 images: the small CNN of the project at widths
32/64/128, a 3-conv CNN written with plain `lax.conv` (what a user brings,
without the project's oneDNN layers; its PyTorch twin written by hand, weights
copied), PreAct ResNet-18 and WRN-16-4 (BatchNorm statistics of one batch). The
project's models go to PyTorch through jax_advprune.models.torch_export; outputs
are checked equal. Our side is what a user calls: `attacks.pgd`, `attacks.deepfool`
and `attacks.autoattack` on a `Partial(apply, variables)`, with the default
mesh (every local device). Throughput does not depend on training, so the models
are at initialisation; for AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square
5,000 queries, on both sides with torchattacks' settings: 10 iterations for APGD
and FAB) eps is the 75th percentile of the batch's DeepFool L-inf distances, so
that about a quarter of the samples survive to FAB-T and Square, as on a robust
model; both sides' robust accuracies are recorded.

Each figure is the median of --repeats calls (at least 3) after a warm-up call,
the sides taking turns, each side's threads set and checked right before each
call, with the spread recorded; the run refuses to write results if other work
ran on the machine (--allow-busy; see benchmarks/hygiene.py). Prints a table and
writes benchmarks/results/attacks.json.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hygiene  # noqa: E402

if __name__ == "__main__":
    _args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _args.add_argument("--batch", type=int, default=256, help="PGD and DeepFool batch of the small and plain CNNs")
    _args.add_argument("--devices", type=int, default=2 * (os.cpu_count() or 1), help="virtual XLA:CPU devices")
    _args.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="cores for both sides: XLA's pool and PyTorch's threads",
    )
    _args.add_argument("--resnet-batch", type=int, default=32, help="batch of PreAct ResNet-18 and WRN-16-4")
    _args.add_argument(
        "--aa-batch",
        type=int,
        default=64,
        help="AutoAttack batch (its cost is Square's 5,000 queries on the survivors)",
    )
    _args.add_argument("--models", default="small_cnn,plain_cnn,preact_resnet18,wrn_16_4")
    _args.add_argument(
        "--autoattack-models", default="small_cnn,plain_cnn", help="models that also get full standard AutoAttack"
    )
    _args.add_argument(
        "--autoattack-only", action="store_true", help="time AutoAttack only (PGD and DeepFool rows skipped)"
    )
    _args.add_argument("--out", default="attacks.json", help="file name under benchmarks/results/")
    hygiene.add_arguments(_args)
    ARGS = _args.parse_args()
    CORES = hygiene.use_cores(ARGS.threads)
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={ARGS.devices}")

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jax.tree_util import Partial  # noqa: E402

from jax_advprune.attacks import autoattack, deepfool, pgd  # noqa: E402
from jax_advprune.attacks.common import flat_norm  # noqa: E402
from jax_advprune.kernels import onednn  # noqa: E402
from jax_advprune.models import create_model  # noqa: E402
from jax_advprune.models.torch_export import to_torch  # noqa: E402

EPS_LINF = 8 / 255
PGD_STEPS = 10
DEEPFOOL_ITERS = 50
AA_STEPS = 10  # torchattacks.AutoAttack's APGD, APGD-T and FAB iterations (the reference's are 100)


def ours_threads() -> dict:
    return hygiene.xla_threads(ARGS.threads)


def torch_threads() -> dict:
    """PyTorch's threads, set right before each of its timings: JAX work in this process (the Flax
    model, the custom-call convolutions) can leave PyTorch's OpenMP at one thread."""
    return hygiene.torch_threads(ARGS.threads)


def compare(sides: dict, repeats: int) -> tuple[dict, dict]:
    """Warms every side up once (compilation), then `hygiene.take_turns`: names starting with 'ours'
    run on XLA's threads, the others on PyTorch's -> (stats per side, last output per side)."""
    for call in sides.values():
        jax.block_until_ready(call())
    threads = {name: ours_threads if name.startswith("ours") else torch_threads for name in sides}
    return hygiene.take_turns(sides, repeats=repeats, threads=threads, block=jax.block_until_ready)


def matmul_flops_per_s() -> float:
    a = jnp.ones((2048, 2048), jnp.float32)
    f = jax.jit(lambda m: m @ m)
    jax.block_until_ready(f(a))
    stats, _ = hygiene.timed(lambda: f(a), repeats=5, threads=ours_threads, block=jax.block_until_ready)
    return 2 * 2048**3 / stats["best_s"]


def images(batch: int, seed: int = 0):
    return np.random.default_rng(seed).uniform(0, 1, (batch, 32, 32, 3)).astype(np.float32)


def project_model(name: str, batch: int):
    """A project model at initialisation (BatchNorm statistics of one batch): (apply_fn, variables, torch twin, x, y)."""
    kwargs = {
        "small_cnn": dict(name="small_cnn", widths=(32, 64, 128)),
        "preact_resnet18": dict(name="preact_resnet18"),
        "wrn_16_4": dict(name="wide_resnet", depth=16, width=4),
    }[name]
    model = create_model(num_classes=10, **kwargs)
    x = images(batch)
    variables = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:2]))
    if "batch_stats" in variables:
        _, updates = model.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
        variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
    variables = jax.device_get(variables)

    def apply_fn(v, z):
        return model.apply(v, z, train=False)

    return apply_fn, variables, to_torch(model, variables, x.shape[1:]), x, model


def plain_cnn(params, x):
    """What a user writes: (B, 32, 32, 3) -> (B, 10); three 3x3 convolutions (32, 64 stride 2, 128 stride 2), ReLU, mean pool, dense."""
    dn = ("NHWC", "HWIO", "NHWC")
    h = x
    for i, stride in enumerate((1, 2, 2)):
        h = jax.nn.relu(
            jax.lax.conv_general_dilated(h, params[f"c{i}"], (stride, stride), ((1, 1), (1, 1)), dimension_numbers=dn)
            + params[f"b{i}"]
        )
    return h.mean(axis=(1, 2)) @ params["w"] + params["b"]


def plain_model(batch: int):
    """plain_cnn with He-initialised weights and its hand-written PyTorch twin: (apply_fn, variables, torch twin, x, None)."""
    import torch

    rng = np.random.default_rng(0)
    widths = (3, 32, 64, 128)
    params = {}
    for i in range(3):
        params[f"c{i}"] = (rng.normal(size=(3, 3, widths[i], widths[i + 1])) * np.sqrt(2 / (9 * widths[i]))).astype(
            np.float32
        )
        params[f"b{i}"] = np.zeros(widths[i + 1], np.float32)
    params["w"] = (rng.normal(size=(128, 10)) * np.sqrt(1 / 128)).astype(np.float32)
    params["b"] = np.zeros(10, np.float32)

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = torch.nn.ModuleList(
                torch.nn.Conv2d(widths[i], widths[i + 1], 3, stride=s, padding=1) for i, s in enumerate((1, 2, 2))
            )
            self.fc = torch.nn.Linear(128, 10)

        def forward(self, x):
            for conv in self.convs:
                x = torch.relu(conv(x))
            return self.fc(x.mean(dim=(2, 3)))

    twin = Twin().eval()
    with torch.no_grad():
        for i, conv in enumerate(twin.convs):
            conv.weight.copy_(torch.tensor(params[f"c{i}"].transpose(3, 2, 0, 1)))
            conv.bias.copy_(torch.tensor(params[f"b{i}"]))
        twin.fc.weight.copy_(torch.tensor(params["w"].T))
        twin.fc.bias.copy_(torch.tensor(params["b"]))
    return plain_cnn, params, twin, images(batch), None


def per_sample_flops(apply_fn, variables, x, num_cotangents: int) -> tuple[float, float]:
    """(forward FLOPs, VJP FLOPs with `num_cotangents` cotangents) per sample, from XLA cost analysis."""

    def forward(v, z):
        return apply_fn(v, z)

    def vjp(v, z):
        logits, pullback = jax.vjp(lambda t: apply_fn(v, t), z)
        cot = jnp.ones((num_cotangents,) + logits.shape)
        return jax.vmap(pullback)(cot)

    def flops(f):
        analysis = jax.jit(f).lower(variables, x).compile().cost_analysis()
        analysis = analysis[0] if isinstance(analysis, list) else analysis
        return float(analysis.get("flops", 0.0)) / len(x)

    # XLA's cost analysis does not see inside the oneDNN custom call: count the same model on XLA's convolutions.
    previous = onednn.get_backend()
    onednn.set_backend("xla")
    try:
        return flops(forward), flops(vjp) - flops(forward)
    finally:
        onednn.set_backend(previous)


def bench_model(label: str, apply_fn, variables, torch_model, x, repeats: int, peak: float, with_autoattack: bool):
    """Rows of the table and DeepFool agreement for one model; see the module docstring.

    Each comparison warms both sides up once, then times them in turns (`compare`).
    The DeepFool reference attacks draw nothing at random and compile nothing, but
    get the same warm-up call so that both sides are timed alike.
    """
    import foolbox as fb
    import torch
    import torchattacks

    logits_fn = Partial(apply_fn, variables)
    y = np.asarray(logits_fn(x)).argmax(1).astype(np.int32)
    x_t, y_t = torch.tensor(x.transpose(0, 3, 1, 2)).contiguous(), torch.tensor(y, dtype=torch.long)
    with torch.no_grad():
        diff = np.abs(torch_model(x_t).numpy() - np.asarray(logits_fn(x))).max()
    assert diff < 1e-3, f"the PyTorch model differs from ours by {diff}"
    key = jax.random.PRNGKey(0)
    fwd_flops, grad_flops = per_sample_flops(apply_fn, variables, x[:8], 1)
    n = len(x)
    rows = []

    def row(attack, ours, ref, theirs, flops, batch=n, **extra):
        t_ours, t_ref = ours["median_s"], theirs["median_s"]
        rows.append(
            dict(
                model=label,
                batch=batch,
                attack=attack,
                ours_img_s=batch / t_ours,
                ref=ref,
                ref_img_s=batch / t_ref,
                speedup=t_ref / t_ours,
                ours_gflop_s=flops / t_ours / 1e9,
                fraction_of_matmul_peak=flops / t_ours / peak,
                ours=ours,
                reference=theirs,
                **extra,
            )
        )

    num_classes = int(np.asarray(logits_fn(x[:1])).shape[-1])
    agreement = {}
    if ARGS.autoattack_only:  # only the DeepFool distances that set AutoAttack's eps, untimed
        linf_distances = np.asarray(deepfool(logits_fn, x, y, norm="linf", max_iter=DEEPFOOL_ITERS).distance)
    else:
        # PGD-10, L-inf, CE, random start.
        atk = torchattacks.PGD(torch_model, eps=EPS_LINF, alpha=EPS_LINF / 4, steps=PGD_STEPS, random_start=True)
        stats, _ = compare(
            {
                "ours": lambda: pgd(logits_fn, x, y, key, eps=EPS_LINF, step_size=EPS_LINF / 4, steps=PGD_STEPS),
                "torchattacks": lambda: atk(x_t, y_t),
            },
            repeats,
        )
        row(
            f"PGD-{PGD_STEPS} linf",
            stats["ours"],
            "torchattacks.PGD",
            stats["torchattacks"],
            n * PGD_STEPS * (fwd_flops + grad_flops),
        )

        # DeepFool, all candidates, L2 and L-inf; distances compared with foolbox's.
        fmodel = fb.PyTorchModel(torch_model, bounds=(0, 1))
        linf_distances = None
        for norm, fb_attack in (("l2", fb.attacks.L2DeepFoolAttack), ("linf", fb.attacks.LinfDeepFoolAttack)):
            attack = fb_attack(steps=DEEPFOOL_ITERS, candidates=num_classes, overshoot=0.02, loss="logits")
            # The same DeepFool inside the user's own jax.jit, the weights closed over (a user's habit): the in-trace form.
            in_user_jit = jax.jit(
                lambda x, y, norm=norm: deepfool(
                    lambda z: apply_fn(variables, z), x, y, norm=norm, max_iter=DEEPFOOL_ITERS
                )
            )
            stats, outputs = compare(
                {
                    "ours": lambda: deepfool(logits_fn, x, y, norm=norm, max_iter=DEEPFOOL_ITERS),
                    "ours_in_user_jit": lambda: in_user_jit(x, y),
                    "foolbox": lambda: attack(fmodel, x_t, y_t, epsilons=None),
                },
                repeats,
            )
            result, (_, fb_adv, fb_success) = outputs["ours"], outputs["foolbox"]
            ours_adv, converged, n_iter = (np.asarray(a) for a in (result.x_adv, result.converged, result.n_iter))
            fb_adv = fb_adv.numpy().transpose(0, 2, 3, 1)
            ours_dist = np.asarray(flat_norm(jnp.asarray(ours_adv - x), norm))
            fb_dist = np.asarray(flat_norm(jnp.asarray(fb_adv - x), norm))
            both = converged & fb_success.numpy() & (fb_dist > 0)
            rel = np.abs(ours_dist[both] - fb_dist[both]) / fb_dist[both]
            agreement[f"{label} {norm}"] = dict(
                samples=int(both.sum()),
                of=n,
                median_rel_diff=float(np.median(rel)),
                p95_rel_diff=float(np.quantile(rel, 0.95)),
            )
            df_flops = float(np.sum(n_iter + 1)) * (fwd_flops + (num_classes - 1) * grad_flops)
            row(
                f"DeepFool {norm} (all classes)",
                stats["ours"],
                "foolbox",
                stats["foolbox"],
                df_flops,
                mean_iterations=float(n_iter.mean()),
            )
            in_jit = outputs["ours_in_user_jit"]
            assert np.allclose(np.asarray(in_jit.distance), np.asarray(result.distance), rtol=1e-3, atol=1e-5), (
                "DeepFool in a jit differs"
            )
            row(
                f"DeepFool {norm}, inside the user's jax.jit",
                stats["ours_in_user_jit"],
                "foolbox",
                stats["foolbox"],
                df_flops,
            )
            if norm == "linf":
                linf_distances = np.asarray(result.distance)

    if with_autoattack:
        m = min(ARGS.aa_batch, n)
        eps = float(np.quantile(linf_distances[:m], 0.75))
        xa, ya = x[:m], y[:m]
        ta = torchattacks.AutoAttack(
            torch_model, norm="Linf", eps=eps, version="standard", n_classes=num_classes, seed=0
        )
        xa_t, ya_t = torch.tensor(xa.transpose(0, 3, 1, 2)).contiguous(), torch.tensor(ya, dtype=torch.long)

        def ours_aa():
            return autoattack(
                logits_fn,
                xa,
                ya,
                key,
                eps=eps,
                apgd_steps=AA_STEPS,
                fab_steps=AA_STEPS,
                num_targets=num_classes - 1,
                report=lambda line: None,
            )

        stats, outputs = compare({"ours": ours_aa, "torchattacks": lambda: ta(xa_t, ya_t)}, repeats)
        with torch.no_grad():
            theirs_robust = float((torch_model(outputs["torchattacks"]).argmax(1) == ya_t).float().mean())
        row(
            "AutoAttack standard linf",
            stats["ours"],
            "torchattacks.AutoAttack",
            stats["torchattacks"],
            float("nan"),
            batch=m,
            eps=eps,
            robust_accuracy_ours=outputs["ours"].robust_accuracy[-1],
            robust_accuracy_torchattacks=theirs_robust,
            robust_after_each_ours=dict(zip(outputs["ours"].attacks, outputs["ours"].robust_accuracy)),
        )
    return rows, agreement


def main() -> None:
    import torch

    guard = hygiene.IdleGuard(ARGS.allow_busy)
    peak = matmul_flops_per_s()
    rows, agreement = [], {}
    labels = {
        "small_cnn": "small CNN 32/64/128",
        "plain_cnn": "plain lax.conv CNN (user's)",
        "preact_resnet18": "PreAct ResNet-18",
        "wrn_16_4": "WRN-16-4",
    }
    for name in ARGS.models.split(","):
        big = name in ("preact_resnet18", "wrn_16_4")
        batch = ARGS.resnet_batch if big else ARGS.batch
        apply_fn, variables, twin, x, _ = plain_model(batch) if name == "plain_cnn" else project_model(name, batch)
        r, a = bench_model(
            labels[name], apply_fn, variables, twin, x, ARGS.repeats, peak, name in ARGS.autoattack_models.split(",")
        )
        rows += r
        agreement.update(a)
    machine_state = guard.finish()

    print(
        f"\n{ARGS.devices} XLA:CPU devices on {ARGS.threads} cores, PyTorch with {ARGS.threads} threads; jitted f32 matmul {peak / 1e9:.1f} GFLOP/s; "
        f"median of {ARGS.repeats}, sides taking turns; other processes used {machine_state['others_cores_mean']:.2f} cores on average"
    )
    print(
        f"{'model':30s} {'batch':>5s} {'attack':26s} {'ours img/s':>10s} {'spread':>6s} {'reference':>22s} {'ref img/s':>9s} {'spread':>6s} {'speedup':>8s} {'GFLOP/s':>8s} {'of peak':>7s}"
    )
    for r in rows:
        print(
            f"{r['model']:30s} {r['batch']:5d} {r['attack']:26s} {r['ours_img_s']:10.1f} {100 * r['ours']['spread']:5.0f}% {r['ref']:>22s} {r['ref_img_s']:9.1f} "
            f"{100 * r['reference']['spread']:5.0f}% {r['speedup']:7.2f}x {r['ours_gflop_s']:8.2f} {100 * r['fraction_of_matmul_peak']:6.1f}%"
        )
    for r in rows:
        if "eps" in r:
            print(
                f"{r['model']}: AutoAttack at eps {r['eps']:.4f} on {r['batch']}: robust accuracy ours {r['robust_accuracy_ours']:.3f}, "
                f"torchattacks {r['robust_accuracy_torchattacks']:.3f}"
            )
    for name, a in agreement.items():
        print(
            f"DeepFool {name}: distance vs foolbox over {a['samples']}/{a['of']} samples both flipped: median rel. diff {100 * a['median_rel_diff']:.3f}%, 95th pct {100 * a['p95_rel_diff']:.3f}%"
        )
    out = hygiene.write_results(
        ARGS.out,
        dict(
            machine=hygiene.machine_record(
                CORES,
                torch=torch.__version__,
                devices=ARGS.devices,
                threads=ARGS.threads,
            ),
            machine_state=machine_state,
            repeats=ARGS.repeats,
            eps_linf_pgd=EPS_LINF,
            matmul_gflop_s=peak / 1e9,
            rows=rows,
            deepfool_agreement_with_foolbox=agreement,
        ),
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
