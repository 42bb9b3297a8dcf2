"""TRADES-10 train-step throughput: jax_advprune vs the reference's PyTorch loop, same model and weights, one run.

    pip install -e ".[bench]"
    python benchmarks/train_step.py [--devices 4] [--threads 2] [--steps 2] [--repeats 5] [--skip-wrn] [--bf16] [--allow-busy]

For each model (small CNN, PreAct ResNet-18, WRN-16-4; 32x32x3 inputs) the Flax
model is initialised once and exported with jax_advprune.models.torch_export, so
both sides start from the same weights. Both run the TRADES step of the
DM-Improves-AT reference (gowal21uncovering/utils/trades.py): uniform random start,
10 signed-gradient steps on KL(p_clean || p_adv) with BatchNorm in training mode but
running averages frozen, then CE with label smoothing 0.1 on the clean logits +
beta * KL(clean || adv) (beta 5), backward, SGD Nesterov with weight decay on
kernels only. Same batch, same --threads cores: ours on virtual XLA:CPU devices (two
per core), PyTorch with one thread per core, in a process of its own. Ours runs twice: with oneDNN convolutions
(jax_advprune.kernels.onednn, the default on the CPU) and with XLA's own
(JAX_ADVPRUNE_CONV=xla). After a warm-up step each (compilation on our side),
`--repeats` rounds (at least 3) each time `--steps` steps of every side in turn, so
that the machine's drift hits all sides alike, each side's threads set and checked
right before its turn; reported: the median images/s over rounds with the spread,
and the ratios of medians. The run refuses to write results if other work ran on
the machine (--allow-busy; see benchmarks/hygiene.py). Prints a table and writes
benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hygiene  # noqa: E402

if __name__ == "__main__":
    _args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _args.add_argument("--devices", type=int, default=2 * (os.cpu_count() or 1), help="virtual XLA:CPU devices")
    _args.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="cores for every side: XLA's pool and PyTorch's threads",
    )
    _args.add_argument("--steps", type=int, default=2, help="timed steps per side and round")
    _args.add_argument("--skip-wrn", action="store_true")
    _args.add_argument(
        "--models", default="small_cnn,preact_resnet18,wide_resnet", help="registry names to time, comma-separated"
    )
    _args.add_argument("--bf16", action="store_true", help="also time our step with bfloat16 compute")
    hygiene.add_arguments(_args)
    hygiene.add_isa_argument(_args)
    _args.set_defaults(repeats=5)
    ARGS = _args.parse_args()
    CORES = hygiene.use_cores(ARGS.threads)
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={ARGS.devices}")
    hygiene.cap_isa(ARGS.isa)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jax_advprune import parallel, training  # noqa: E402
from jax_advprune.kernels import onednn  # noqa: E402
from jax_advprune.models import create_model  # noqa: E402
from jax_advprune.models.torch_export import to_torch  # noqa: E402

EPS, STEP, ATTACK_STEPS, BETA, SMOOTHING, LR = 8 / 255, 2 / 255, 10, 5.0, 0.1, 0.1

MODELS = [  # (label, registry name, kwargs, batch)
    (
        "small CNN (32/64/128)",
        "small_cnn",
        dict(widths=(32, 64, 128), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        128,
    ),
    ("PreAct ResNet-18", "preact_resnet18", {}, 32),
    ("WRN-16-4 (Swish)", "wide_resnet", dict(depth=16, width=4, activation="swish"), 32),
]


def train_config():
    cfg = ml_collections.ConfigDict(
        dict(
            loss="trades",
            trades_beta=BETA,
            label_smoothing=SMOOTHING,
            lr=LR,
            momentum=0.9,
            nesterov=True,
            weight_decay=5e-4,
            warmup_steps=0,
            ema_decay=0.995,
            ema_warmup_steps=0,
        )
    )
    attack = ml_collections.ConfigDict(dict(norm="linf", eps=EPS, step_size=STEP, steps=ATTACK_STEPS))
    return cfg, attack


def our_stepper(model, variables, batch: dict, conv_backend: str) -> tuple[Callable[[], None], float]:
    """(run one step, first loss) of our jitted TRADES step on the mesh, convolutions from `conv_backend`."""
    cfg, attack = train_config()
    tx = training.make_optimizer(cfg, 1000)
    state = training.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        ema_params=jax.tree_util.tree_map(jnp.copy, variables["params"]),
        rng=jax.random.PRNGKey(0),
    )
    onednn.set_backend(conv_backend)  # read while the step is traced, i.e. on its first call
    step_fn = training.make_train_step(model, tx, cfg, attack, parallel.make_mesh(ARGS.devices))
    holder = list(step_fn(state, batch))  # compiles
    first_loss = float(holder[1]["loss"])

    def step():
        holder[0], holder[1] = step_fn(holder[0], batch)
        jax.block_until_ready(holder[0])

    return step, first_loss


def reference_stepper(torch_model, batch: dict) -> tuple[Callable[[], float], float]:
    """(run one step, first loss) of the reference's PyTorch TRADES step."""
    import torch
    import torch.nn.functional as F

    model = torch_model.train()
    batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        momentum=0.9,
        nesterov=True,
    )
    kl = torch.nn.KLDivLoss(reduction="batchmean")
    x = torch.tensor(batch["image"].transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    y = torch.tensor(batch["label"], dtype=torch.long)

    def step():
        for bn in batch_norms:  # the reference's track_bn_stats(model, False): batch statistics, no update
            bn.momentum = 0.0
        x_adv = torch.clamp(x + torch.empty_like(x).uniform_(-EPS, EPS), 0.0, 1.0)
        p_natural = F.softmax(model(x), dim=1).detach()
        for _ in range(ATTACK_STEPS):
            x_adv.requires_grad_()
            loss_kl = kl(F.log_softmax(model(x_adv), dim=1), p_natural)
            grad = torch.autograd.grad(loss_kl, [x_adv])[0]
            x_adv = torch.min(torch.max(x_adv.detach() + STEP * torch.sign(grad), x - EPS), x + EPS).clamp(0.0, 1.0)
        for bn in batch_norms:
            bn.momentum = 0.1
        optimizer.zero_grad()
        logits_natural, logits_adv = model(x), model(x_adv)
        loss = F.cross_entropy(logits_natural, y, label_smoothing=SMOOTHING) + BETA * kl(
            F.log_softmax(logits_adv, dim=1), F.softmax(logits_natural, dim=1)
        )
        loss.backward()
        optimizer.step()
        return float(loss)

    return step, step()  # the first call warms up


def reference_worker(conn, name: str, kwargs: dict, batch: dict, threads: int) -> None:
    """The PyTorch side in its own process: builds the model from the same Flax initialisation, checks the
    export, answers ('ready', first loss) and then the seconds taken by each requested number of steps.

    A process of its own because PyTorch and oneDNN share one OpenMP runtime when loaded together (both
    name it libgomp.so.1), and in one process the reference ran at about half its speed.
    """
    os.environ["JAX_ADVPRUNE_CONV"] = "xla"  # the Flax model here only initialises weights and checks the export
    import torch

    model = create_model(name, num_classes=10, **kwargs)
    variables = jax.device_get(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    torch_model = to_torch(model, variables, (32, 32, 3))
    x = batch["image"][:4].astype(np.float32) / 255.0
    with torch.no_grad():
        diff = np.abs(
            torch_model(torch.tensor(x.transpose(0, 3, 1, 2))).numpy() - np.asarray(model.apply(variables, x))
        ).max()
    if diff >= 1e-3:
        conn.send(("error", f"{name}: exported model differs by {diff}"))
        return
    # Set after JAX has run here: running the Flax model left PyTorch's OpenMP at one thread.
    try:
        hygiene.torch_threads(threads)
        step, first_loss = reference_stepper(torch_model, batch)
    except RuntimeError as error:
        conn.send(("error", str(error)))
        return
    conn.send(("ready", first_loss))
    while (steps := conn.recv()) is not None:
        try:
            record = hygiene.torch_threads(threads)  # set and checked right before every timed turn
        except RuntimeError as error:
            conn.send(("error", str(error)))
            return
        start = time.perf_counter()
        for _ in range(steps):
            step()
        conn.send((time.perf_counter() - start, record))


def start_reference(
    name: str, kwargs: dict, batch: dict
) -> tuple[Callable[[int], float], float, Callable[[], None], Callable[[], dict]]:
    """(seconds for n reference steps, first loss, stop, the threads record of the last turn) with the
    reference in a spawned process (which inherits this process's cores)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=reference_worker, args=(child, name, kwargs, batch, ARGS.threads), daemon=True)
    process.start()
    status, value = parent.recv()
    if status != "ready":
        raise RuntimeError(value)

    last_record = {}

    def run(steps: int) -> float:
        parent.send(steps)
        answer = parent.recv()
        if answer[0] == "error":
            raise RuntimeError(answer[1])
        seconds, last_record["threads"] = answer
        return seconds

    def stop() -> None:
        parent.send(None)
        process.join(timeout=30)

    return run, value, stop, lambda: last_record.get("threads", {})


def local_steps(step: Callable[[], None]) -> Callable[[], None]:
    """() -> runs --steps calls of step() in this process."""

    def run() -> None:
        for _ in range(ARGS.steps):
            step()

    return run


def main() -> None:
    guard = hygiene.IdleGuard(ARGS.allow_busy)
    rows = []
    for label, name, kwargs, batch_size in MODELS:
        if (ARGS.skip_wrn and name == "wide_resnet") or name not in ARGS.models.split(","):
            continue
        rng = np.random.default_rng(0)
        batch = {
            "image": rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8),
            "label": rng.integers(0, 10, batch_size).astype(np.int32),
            "eps": np.full(batch_size, EPS, np.float32),
        }
        model = create_model(name, num_classes=10, **kwargs)
        variables = jax.device_get(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
        reference, loss_ref, stop_reference, reference_record = start_reference(name, kwargs, batch)
        sides = {"ref": lambda: reference(ARGS.steps)}
        threads = {"ref": lambda: {"checked_in_the_reference_process": True}}
        first_losses = {"ref": loss_ref}
        for backend in ("onednn", "xla"):
            step, first_losses[backend] = our_stepper(model, variables, batch, backend)
            sides[backend], threads[backend] = local_steps(step), lambda: hygiene.xla_threads(ARGS.threads)
        if ARGS.bf16:
            bf16_model = create_model(name, num_classes=10, dtype=jnp.bfloat16, **kwargs)
            step, first_losses["bf16"] = our_stepper(bf16_model, variables, batch, "auto")
            sides["bf16"], threads["bf16"] = local_steps(step), lambda: hygiene.xla_threads(ARGS.threads)
        stats, _ = hygiene.take_turns(sides, repeats=ARGS.repeats, threads=threads)
        stats["ref"]["threads"] = reference_record()
        stop_reference()
        median = {k: batch_size * ARGS.steps / v["median_s"] for k, v in stats.items()}
        row = dict(
            model=label,
            batch=batch_size,
            ours_img_s=median["onednn"],
            ours_xla_conv_img_s=median["xla"],
            ref_img_s=median["ref"],
            speedup=median["onednn"] / median["ref"],
            speedup_xla_conv=median["xla"] / median["ref"],
            spread=dict(
                ours=stats["onednn"]["spread"], ours_xla_conv=stats["xla"]["spread"], ref=stats["ref"]["spread"]
            ),
            timings=stats,
            first_losses=first_losses,
        )
        if ARGS.bf16:
            row["ours_bf16_img_s"] = median["bf16"]
        rows.append(row)
        print(
            f"{label:24s} batch {batch_size:4d}: ours {row['ours_img_s']:7.1f} img/s (XLA convolutions {row['ours_xla_conv_img_s']:.1f}), "
            f"PyTorch {row['ref_img_s']:7.1f} img/s, {row['speedup']:.2f}x ({row['speedup_xla_conv']:.2f}x); spreads "
            + ", ".join(f"{k} {100 * v:.0f}%" for k, v in row["spread"].items())
            + "; first losses "
            + ", ".join(f"{k} {v:.4f}" for k, v in first_losses.items()),
            flush=True,
        )

    machine_state = guard.finish()
    print(
        f"\nTRADES-10 train step, {ARGS.devices} XLA:CPU devices on {ARGS.threads} cores vs {ARGS.threads} torch threads, "
        f"median of {ARGS.repeats} rounds of {ARGS.steps} steps; other processes used {machine_state['others_cores_mean']:.2f} cores on average\n"
    )
    print(
        "| model | batch | ours img/s | PyTorch img/s | speedup | ours, XLA convolutions | speedup |"
        + (" ours bf16 img/s |" if ARGS.bf16 else "")
    )
    print("| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if ARGS.bf16 else ""))
    for r in rows:
        extra = f" {r['ours_bf16_img_s']:.1f} |" if ARGS.bf16 else ""
        print(
            f"| {r['model']} | {r['batch']} | {r['ours_img_s']:.1f} | {r['ref_img_s']:.1f} | {r['speedup']:.2f}x "
            f"| {r['ours_xla_conv_img_s']:.1f} | {r['speedup_xla_conv']:.2f}x |{extra}"
        )
    out = hygiene.write_results(
        hygiene.results_name("train_step", ARGS.isa),
        dict(
            machine=hygiene.machine_record(
                CORES,
                torch=importlib.metadata.version("torch"),
                devices=ARGS.devices,
                threads=ARGS.threads,
                **hygiene.cpu_record(ARGS.isa),
            ),
            machine_state=machine_state,
            settings=dict(
                eps=EPS,
                step=STEP,
                attack_steps=ATTACK_STEPS,
                beta=BETA,
                label_smoothing=SMOOTHING,
                steps_per_round=ARGS.steps,
                rounds=ARGS.repeats,
            ),
            rows=rows,
        ),
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
