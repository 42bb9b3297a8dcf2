"""Attack throughput: jax_advprune vs torchattacks and foolbox, same model and weights, one run.

    pip install -e ".[bench]"
    python benchmarks/attacks.py [--batch 128] [--resnet-batch 16] [--devices 4] [--threads 2] [--repeats 3] [--allow-busy]

Two models: the small CNN of configs/default.py (16x16x1 inputs), PGD-AT trained
for 60 steps on the embedded data so that its margins are not trivial, and a
PreAct ResNet-18 at initialisation on 32x32x3 inputs. Each is exported to PyTorch
with jax_advprune.models.torch_export (outputs checked equal), and both sides
attack the same batch on the same --threads cores. Every figure is the median of
--repeats calls (at least 3) after a warm-up call, the sides taking turns, each
side's threads set and checked right before each call, with the spread recorded;
the run refuses to write results if other work ran on the machine (--allow-busy;
see benchmarks/hygiene.py). Prints a table and writes benchmarks/results/attacks.json.

FLOP/s: XLA's cost analysis of one forward and one input-gradient pass per
sample, multiplied by the passes each attack makes (DeepFool: per sample
n_iter + 1 forwards and as many (candidates - 1)-cotangent VJPs), divided by the
median wall time; the yardstick is a jitted 2048 x 2048 float32 matmul.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hygiene  # noqa: E402

if __name__ == "__main__":
    _args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _args.add_argument("--batch", type=int, default=128)
    _args.add_argument("--devices", type=int, default=2 * (os.cpu_count() or 1), help="virtual XLA:CPU devices")
    _args.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores for both sides: XLA's pool and PyTorch's threads")
    _args.add_argument("--resnet-batch", type=int, default=16)
    _args.add_argument("--skip-resnet", action="store_true")
    hygiene.add_arguments(_args)
    ARGS = _args.parse_args()
    CORES = hygiene.use_cores(ARGS.threads)
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={ARGS.devices}")

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jax_advprune import parallel  # noqa: E402
from jax_advprune.attacks import pgd  # noqa: E402
from jax_advprune.attacks.apgd import apgd  # noqa: E402
from jax_advprune.attacks.common import flat_norm  # noqa: E402
from jax_advprune.kernels import onednn  # noqa: E402
from jax_advprune.models import create_model  # noqa: E402
from jax_advprune.models.torch_export import to_torch  # noqa: E402
from jax_advprune.pruning.margins import deepfool_runner  # noqa: E402

EPS_LINF = 0.05
PGD_STEPS = 10
APGD_STEPS = 10
DEEPFOOL_ITERS = 50


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


def trained_model(batch: int):
    """The default config's small CNN after 60 PGD-AT steps on the embedded data: (model, variables, x, y)."""
    import ml_collections

    from jax_advprune import training
    from jax_advprune.data.generate import write_embedded_default
    from jax_advprune.data.sources import NpzPart

    paths = write_embedded_default(os.path.join(REPO, "runs", "bench_data"), image_size=16, synthetic_size=2000, test_fraction=0.15, seed=0)
    train = NpzPart(paths["train"], 10)
    images = np.asarray(train.images)
    labels = train.labels().astype(np.int32)
    model = create_model("small_cnn", num_classes=10, widths=(16, 32, 64))
    cfg = ml_collections.ConfigDict(dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, warmup_steps=5, label_smoothing=0.0, ema_decay=0.0, ema_warmup_steps=0, loss="pgd_at"))
    attack = ml_collections.ConfigDict(dict(norm="linf", eps=EPS_LINF, step_size=EPS_LINF / 4, steps=5))
    tx = training.make_optimizer(cfg, 60)
    mesh = parallel.make_mesh(1)
    step = training.make_train_step(model, tx, cfg, attack, mesh)
    state = training.init_train_state(model, tx, images.shape[1:], seed=0)
    rng = np.random.default_rng(0)
    for _ in range(60):
        idx = rng.integers(0, len(labels), 128)
        state, _ = step(state, {"image": images[idx], "label": labels[idx], "eps": np.full(128, EPS_LINF, np.float32)})
    test = NpzPart(paths["test"], 10)
    x = np.asarray(test.images[:batch], np.float32) / 255.0
    y = test.labels()[:batch].astype(np.int32)
    return model, jax.device_get(state.variables()), x, y


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


def random_resnet(batch: int):
    """PreAct ResNet-18 (width 64) at initialisation with BatchNorm statistics of one batch, on
    uniform 32x32x3 images: (model, variables, x, y). Throughput does not depend on training."""
    model = create_model("preact_resnet18", num_classes=10)
    x = np.random.default_rng(0).uniform(0, 1, (batch, 32, 32, 3)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:2]))
    _, updates = model.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
    y = np.asarray(model.apply(variables, x)).argmax(1).astype(np.int32)
    return model, jax.device_get(variables), x, y


def bench_model(label: str, model, variables, x, y, repeats: int, peak: float):
    """Rows of the table and DeepFool agreement for one model; see the module docstring.

    Each comparison warms both sides up once, then times them in turns (`compare`).
    The DeepFool reference attacks draw nothing at random and compile nothing, but
    get the same warm-up call so that both sides are timed alike.
    """
    import foolbox as fb
    import torch
    import torchattacks

    apply_fn = lambda v, z: model.apply(v, z, train=False)  # noqa: E731
    torch_model = to_torch(model, variables, x.shape[1:])
    x_t, y_t = torch.tensor(x.transpose(0, 3, 1, 2)), torch.tensor(y, dtype=torch.long)
    with torch.no_grad():
        diff = np.abs(torch_model(x_t).numpy() - np.asarray(apply_fn(variables, x))).max()
    assert diff < 1e-3, f"exported model differs from the Flax model by {diff}"

    mesh = parallel.make_mesh(ARGS.devices)
    xs = jax.device_put(x, parallel.batch_sharding(mesh))
    ys = jax.device_put(y, parallel.batch_sharding(mesh))
    key = jax.random.PRNGKey(0)
    fwd_flops, grad_flops = per_sample_flops(apply_fn, variables, x[:8], 1)
    n = len(x)
    rows = []

    def sharded(fn, num_replicated):
        return jax.jit(parallel.shard_over_batch(fn, mesh, num_replicated))

    def row(attack, ours, ref, theirs, flops, **extra):
        t_ours, t_ref = ours["median_s"], theirs["median_s"]
        rows.append(dict(model=label, batch=n, attack=attack, ours_img_s=n / t_ours, ref=ref, ref_img_s=n / t_ref,
                         speedup=t_ref / t_ours, ours_gflop_s=flops / t_ours / 1e9, fraction_of_matmul_peak=flops / t_ours / peak,
                         ours=ours, reference=theirs, **extra))

    # PGD-10, L-inf, CE, random start.
    ours_pgd = sharded(lambda v, k, z, t: pgd(lambda q: apply_fn(v, q), z, t, parallel.shard_key(k), eps=EPS_LINF, step_size=EPS_LINF / 4, steps=PGD_STEPS), 2)
    atk = torchattacks.PGD(torch_model, eps=EPS_LINF, alpha=EPS_LINF / 4, steps=PGD_STEPS, random_start=True)
    stats, _ = compare({"ours": lambda: ours_pgd(variables, key, xs, ys), "torchattacks": lambda: atk(x_t, y_t)}, repeats)
    row(f"PGD-{PGD_STEPS} linf", stats["ours"], "torchattacks.PGD", stats["torchattacks"], n * PGD_STEPS * (fwd_flops + grad_flops))

    # APGD-CE, L-inf.
    ours_apgd = sharded(lambda v, k, z, t: apgd(lambda q: apply_fn(v, q), z, t, parallel.shard_key(k), eps=EPS_LINF, steps=APGD_STEPS, loss="ce", unroll=True), 2)
    atk = torchattacks.APGD(torch_model, norm="Linf", eps=EPS_LINF, steps=APGD_STEPS, n_restarts=1, loss="ce", seed=0)
    stats, _ = compare({"ours": lambda: ours_apgd(variables, key, xs, ys), "torchattacks": lambda: atk(x_t, y_t)}, repeats)
    row(f"APGD-CE-{APGD_STEPS} linf", stats["ours"], "torchattacks.APGD", stats["torchattacks"], n * (APGD_STEPS + 1) * (fwd_flops + grad_flops))

    # DeepFool, all candidates, L2 and L-inf, then ours with the top-3 candidates against
    # foolbox with all of them; distances compared with foolbox's.
    fmodel = fb.PyTorchModel(torch_model, bounds=(0, 1))
    num_classes = int(np.asarray(apply_fn(variables, x[:1])).shape[-1])
    agreement = {}
    for norm, candidates, fb_attack in (
        ("l2", None, fb.attacks.L2DeepFoolAttack),
        ("linf", None, fb.attacks.LinfDeepFoolAttack),
        ("l2", 3, fb.attacks.L2DeepFoolAttack),
    ):
        slots = max(n // 2 // ARGS.devices, 1) * ARGS.devices
        run = deepfool_runner(apply_fn, slots=slots, norm=norm, max_iter=DEEPFOOL_ITERS, overshoot=0.02, candidates=candidates, mesh=mesh)
        which = "all classes" if candidates is None else f"top-{candidates} vs all"
        attack = fb_attack(steps=DEEPFOOL_ITERS, candidates=10, overshoot=0.02, loss="logits")
        sides = {"ours": lambda: run(variables, xs, ys), "foolbox": lambda: attack(fmodel, x_t, y_t, epsilons=None)}
        if norm == "l2" and candidates is None:
            ta_deepfool = torchattacks.DeepFool(torch_model, steps=DEEPFOOL_ITERS, overshoot=0.02)
            sides["torchattacks"] = lambda: ta_deepfool(x_t, y_t)
        stats, outputs = compare(sides, repeats)
        result, (_, fb_adv, fb_success) = outputs["ours"], outputs["foolbox"]
        ours_adv, converged, n_iter = (np.asarray(a) for a in (result.x_adv, result.converged, result.n_iter))
        fb_adv = fb_adv.numpy().transpose(0, 2, 3, 1)
        ours_dist = np.asarray(flat_norm(jnp.asarray(ours_adv - x), norm))
        fb_dist = np.asarray(flat_norm(jnp.asarray(fb_adv - x), norm))
        both = converged & fb_success.numpy() & (fb_dist > 0)
        rel = np.abs(ours_dist[both] - fb_dist[both]) / fb_dist[both]
        agreement[f"{label} {norm} {which}"] = dict(samples=int(both.sum()), of=n, median_rel_diff=float(np.median(rel)), p95_rel_diff=float(np.quantile(rel, 0.95)))
        df_flops = float(np.sum(n_iter + 1)) * (fwd_flops + ((candidates or num_classes) - 1) * grad_flops)
        row(f"DeepFool {norm} ({which})", stats["ours"], "foolbox", stats["foolbox"], df_flops, mean_iterations=float(n_iter.mean()))
        if "torchattacks" in stats:
            row("DeepFool l2 (all classes)", stats["ours"], "torchattacks.DeepFool", stats["torchattacks"], df_flops, mean_iterations=float(n_iter.mean()))
    return rows, agreement


def main() -> None:
    import torch

    guard = hygiene.IdleGuard(ARGS.allow_busy)
    peak = matmul_flops_per_s()
    rows, agreement = [], {}
    models = [("small CNN 16x16x1 (trained 60 steps)", trained_model(ARGS.batch))]
    if not ARGS.skip_resnet:
        models.append(("PreAct ResNet-18 32x32x3 (init)", random_resnet(ARGS.resnet_batch)))
    for label, (model, variables, x, y) in models:
        r, a = bench_model(label, model, variables, x, y, ARGS.repeats, peak)
        rows += r
        agreement.update(a)
    machine_state = guard.finish()

    print(f"\n{ARGS.devices} XLA:CPU devices on {ARGS.threads} cores, PyTorch with {ARGS.threads} threads; jitted f32 matmul {peak / 1e9:.1f} GFLOP/s; "
          f"median of {ARGS.repeats}, sides taking turns; other processes used {machine_state['others_cores_mean']:.2f} cores on average")
    print(f"{'model':38s} {'attack':26s} {'ours img/s':>10s} {'spread':>6s} {'reference':>22s} {'ref img/s':>9s} {'spread':>6s} {'speedup':>8s} {'GFLOP/s':>8s} {'of peak':>7s}")
    for r in rows:
        print(f"{r['model']:38s} {r['attack']:26s} {r['ours_img_s']:10.1f} {100 * r['ours']['spread']:5.0f}% {r['ref']:>22s} {r['ref_img_s']:9.1f} "
              f"{100 * r['reference']['spread']:5.0f}% {r['speedup']:7.2f}x {r['ours_gflop_s']:8.2f} {100 * r['fraction_of_matmul_peak']:6.1f}%")
    for name, a in agreement.items():
        print(f"DeepFool {name}: distance vs foolbox over {a['samples']}/{a['of']} samples both flipped: median rel. diff {100 * a['median_rel_diff']:.3f}%, 95th pct {100 * a['p95_rel_diff']:.3f}%")
    os.makedirs(os.path.join(REPO, "benchmarks", "results"), exist_ok=True)
    out = os.path.join(REPO, "benchmarks", "results", "attacks.json")
    with open(out, "w") as f:
        json.dump(dict(
            machine=dict(platform=platform.platform(), cpus=os.cpu_count(), cores_used=CORES, jax=jax.__version__, torch=torch.__version__,
                         devices=ARGS.devices, threads=ARGS.threads),
            machine_state=machine_state, repeats=ARGS.repeats, eps_linf=EPS_LINF, matmul_gflop_s=peak / 1e9, rows=rows,
            deepfool_agreement_with_foolbox=agreement,
        ), f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
