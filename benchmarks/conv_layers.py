"""Convolution layers of the benchmarked models, XLA:CPU vs PyTorch: forward, input gradient, kernel gradient.

    pip install -e ".[bench]"
    python benchmarks/conv_layers.py [--batch 32] [--threads 2] [--calls 10] [--repeats 3] [--allow-busy]

Explains benchmarks/train_step.py: a TRADES-10 step is 13 forward passes, 12
input-gradient passes and 2 kernel-gradient passes of every convolution, so
these three per-layer times bound what the step can reach. Each 3x3 convolution
(padding 1, as PyTorch's) and each 1x1 shortcut (padding 0) of the small CNN,
PreAct ResNet-18 and WRN-16-4 (32x32 inputs) is
timed with the same data, in the same run, three ways: XLA's own convolution and
our oneDNN custom call (jax_advprune.kernels.onednn, strided 1x1 ones as it routes
them), each on one XLA:CPU device,
and PyTorch with `--threads` threads, on the same --threads cores. `--isa AVX2` caps
every side's instruction set (benchmarks/hygiene.py, `cap_isa`) and writes
conv_layers_avx2.json:

- forward: y = conv(x, w)
- input gradient: dL/dx given dL/dy (jax.vjp in x; torch's
  aten.convolution_backward with output_mask (True, False, False)), no forward
- kernel gradient: dL/dw given dL/dy (jax.vjp in w; output_mask (False, True, False))

All results are checked against PyTorch's before timing. Each time is the mean of
--calls calls, median of --repeats rounds (at least 3) in which the three sides
take turns, with each side's threads set and checked right before its turn and the
spread recorded; the run refuses to write results if other work ran on the
machine (--allow-busy; see benchmarks/hygiene.py). Prints a table with
milliseconds and PyTorch-time / our-time ratios (> 1: ours faster) and writes
benchmarks/results/conv_layers.json.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hygiene  # noqa: E402

if __name__ == "__main__":
    _args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _args.add_argument("--batch", type=int, default=32)
    _args.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="cores for every side: XLA's pool and PyTorch's threads",
    )
    _args.add_argument("--calls", type=int, default=10, help="timed calls per measurement and round")
    hygiene.add_arguments(_args)
    hygiene.add_isa_argument(_args)
    ARGS = _args.parse_args()
    CORES = hygiene.use_cores(ARGS.threads)
    hygiene.cap_isa(ARGS.isa)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jax_advprune.kernels import onednn  # noqa: E402

DIMENSIONS = ("NHWC", "HWIO", "NHWC")

LAYERS = [  # (model, input size, in channels, out channels, stride, kernel), each once even where a model repeats it
    ("small CNN", 32, 3, 32, 1, 3),
    ("small CNN", 32, 32, 64, 2, 3),
    ("small CNN", 16, 64, 128, 2, 3),
    ("ResNet-18", 32, 3, 64, 1, 3),
    ("ResNet-18", 32, 64, 64, 1, 3),
    ("ResNet-18", 32, 64, 128, 2, 3),
    ("ResNet-18", 16, 128, 128, 1, 3),
    ("ResNet-18", 16, 128, 256, 2, 3),
    ("ResNet-18", 8, 256, 256, 1, 3),
    ("ResNet-18", 8, 256, 512, 2, 3),
    ("ResNet-18", 4, 512, 512, 1, 3),
    ("ResNet-18", 32, 64, 128, 2, 1),
    ("ResNet-18", 16, 128, 256, 2, 1),
    ("ResNet-18", 8, 256, 512, 2, 1),  # shortcuts
    ("WRN-16-4", 32, 16, 64, 1, 3),
    ("WRN-16-4", 16, 128, 128, 1, 3),
    ("WRN-16-4", 32, 16, 64, 1, 1),
    ("WRN-16-4", 32, 64, 128, 2, 1),
    ("WRN-16-4", 16, 128, 256, 2, 1),  # shortcuts
]


def time_sides(sides: dict, calls: int) -> dict[str, dict]:
    """{side: hygiene stats of the mean time of `calls` calls, in ms} for zero-argument functions,
    after one warm call each; rounds with the sides in turn ('torch' on PyTorch's threads, the others on XLA's)."""
    for fn in sides.values():
        jax.block_until_ready(fn())

    def repeated(fn):
        def run():
            for _ in range(calls):
                out = fn()
            return out

        return run

    threads = {
        name: (lambda: hygiene.torch_threads(ARGS.threads))
        if name == "torch"
        else (lambda: hygiene.xla_threads(ARGS.threads))
        for name in sides
    }
    stats, _ = hygiene.take_turns(
        {name: repeated(fn) for name, fn in sides.items()},
        repeats=ARGS.repeats,
        threads=threads,
        block=jax.block_until_ready,
    )
    return {
        name: dict(
            median_ms=v["median_s"] / calls * 1e3,
            spread=v["spread"],
            threads=v["threads"],
            cores_busy_all=v["cores_busy_all"],
        )
        for name, v in stats.items()
    }


def jax_functions(stride: int, kernel: int, conv_general_dilated):
    """Jitted (forward(x, w), input_grad(x, w, g), kernel_grad(x, w, g)) of a kernel x kernel convolution padded by
    kernel // 2 (1 for 3x3, 0 for the 1x1 shortcuts), NHWC/HWIO."""
    pad = kernel // 2

    def conv(x, w):
        return conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=DIMENSIONS)

    forward = jax.jit(conv)
    input_grad = jax.jit(lambda x, w, g: jax.vjp(lambda x_: conv(x_, w), x)[1](g)[0])
    kernel_grad = jax.jit(lambda x, w, g: jax.vjp(lambda w_: conv(x, w_), w)[1](g)[0])
    return forward, input_grad, kernel_grad


def torch_functions(stride: int, kernel: int):
    """(forward(x, w), input_grad(x, w, g), kernel_grad(x, w, g)) with PyTorch NCHW/OIHW tensors."""
    import torch

    pad = kernel // 2

    def backward(x, w, g, mask):
        return torch.ops.aten.convolution_backward(
            g, x, w, None, [stride] * 2, [pad, pad], [1, 1], False, [0, 0], 1, mask
        )

    return (
        lambda x, w: torch.nn.functional.conv2d(x, w, stride=stride, padding=pad),
        lambda x, w, g: backward(x, w, g, [True, False, False])[0],
        lambda x, w, g: backward(x, w, g, [False, True, False])[1],
    )


def measure_layer(size: int, cin: int, cout: int, stride: int, kernel: int, batch: int, calls: int) -> dict:
    """Times of the three operations on both sides for one layer, after checking that they agree."""
    import torch

    rng = np.random.default_rng(0)
    out_size = -(-size // stride)
    x = rng.standard_normal((batch, size, size, cin), np.float32)
    w = (rng.standard_normal((kernel, kernel, cin, cout)) / np.sqrt(kernel * kernel * cin)).astype(np.float32)
    g = rng.standard_normal((batch, out_size, out_size, cout), np.float32)
    jx, jw, jg = (jax.device_put(a) for a in (x, w, g))
    tx, tw, tg = (
        torch.tensor(x.transpose(0, 3, 1, 2)),
        torch.tensor(w.transpose(3, 2, 0, 1)),
        torch.tensor(g.transpose(0, 3, 1, 2)),
    )
    theirs = torch_functions(stride, kernel)
    onednn.set_backend("onednn")  # read while the functions below are traced
    sides = {
        "xla": jax_functions(stride, kernel, lax.conv_general_dilated),
        "onednn": jax_functions(stride, kernel, onednn.conv_general_dilated),
    }
    to_nhwc = (
        lambda a: a.numpy().transpose(0, 2, 3, 1),
        lambda a: a.numpy().transpose(0, 2, 3, 1),
        lambda a: a.numpy().transpose(2, 3, 1, 0),
    )
    arguments = ((jx, jw), (jx, jw, jg), (jx, jw, jg))
    for ours in sides.values():
        for our_fn, their_fn, args, convert in zip(ours, theirs, arguments, to_nhwc):
            expected = convert(their_fn(*(tx, tw, tg)[: len(args)]))
            np.testing.assert_allclose(
                np.asarray(our_fn(*args)), expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max()
            )
    row = {"spread": {}}
    for i, op in enumerate(("forward", "input_grad", "kernel_grad")):
        args, torch_args = arguments[i], (tx, tw, tg)[: len(arguments[i])]
        calls_of = {side: (lambda fn=fns[i]: fn(*args)) for side, fns in sides.items()}
        calls_of["torch"] = lambda: theirs[i](*torch_args)
        with torch.no_grad():
            stats = time_sides(calls_of, calls)
        for side, v in stats.items():
            row[f"{op}_{side}_ms"] = v["median_ms"]
            row["spread"][f"{op}_{side}"] = v["spread"]
        row.setdefault("threads", {side: v["threads"] for side, v in stats.items()})
        row[f"{op}_ratio"] = row[f"{op}_torch_ms"] / row[f"{op}_xla_ms"]
        row[f"{op}_onednn_ratio"] = row[f"{op}_torch_ms"] / row[f"{op}_onednn_ms"]
    flops = 2 * batch * out_size * out_size * kernel * kernel * cin * cout
    for side in ("xla", "onednn", "torch"):
        row[f"forward_{side}_gflop_s"] = flops / row[f"forward_{side}_ms"] / 1e6
    return row


def main() -> None:
    import torch

    guard = hygiene.IdleGuard(ARGS.allow_busy)
    rows = []
    ops = ("forward", "input_grad", "kernel_grad")
    header = "| model | layer | " + " | ".join(f"{op}: XLA / oneDNN / torch ms | ratios" for op in ops) + " |"
    lines = [header, "| --- | --- |" + " --- | --- |" * len(ops)]
    for model, size, cin, cout, stride, kernel in LAYERS:
        row = dict(model=model, size=size, cin=cin, cout=cout, stride=stride, kernel=kernel, batch=ARGS.batch)
        row.update(measure_layer(size, cin, cout, stride, kernel, ARGS.batch, ARGS.calls))
        rows.append(row)
        cells = " | ".join(
            f"{row[f'{op}_xla_ms']:.1f} / {row[f'{op}_onednn_ms']:.1f} / {row[f'{op}_torch_ms']:.1f} | {row[f'{op}_ratio']:.2f}x / {row[f'{op}_onednn_ratio']:.2f}x"
            for op in ops
        )
        lines.append(f"| {model} | {size}x{size} {cin}->{cout} {kernel}x{kernel} s{stride} | {cells} |")
        print(lines[-1], flush=True)

    def ratios(selected):
        return {
            side: {
                op: sum(r[f"{op}_torch_ms"] for r in selected) / sum(r[f"{op}_{side}_ms"] for r in selected)
                for op in ops
            }
            for side in ("xla", "onednn")
        }

    totals = ratios(rows)
    per_model = {
        model: ratios([r for r in rows if r["model"] == model]) for model in dict.fromkeys(r["model"] for r in rows)
    }
    machine_state = guard.finish()
    worst = max(max(r["spread"].values()) for r in rows)
    print(
        f"\nbatch {ARGS.batch}, 1 XLA:CPU device on {ARGS.threads} cores vs {ARGS.threads} torch threads; ratio = PyTorch time / our time (> 1: ours faster), "
        f"XLA's convolution / our oneDNN custom call; median of {ARGS.repeats} rounds of {ARGS.calls} calls, largest spread {100 * worst:.0f}%; "
        f"other processes used {machine_state['others_cores_mean']:.2f} cores on average\n"
    )
    print("\n".join(lines))
    for side, side_totals in totals.items():
        print(f"\nall layers, {side}: " + ", ".join(f"{op} {ratio:.2f}x" for op, ratio in side_totals.items()))
    for model, sides_ratios in per_model.items():
        print(
            f"{model}: "
            + "; ".join(
                f"{side} " + ", ".join(f"{op} {v:.2f}x" for op, v in r.items()) for side, r in sides_ratios.items()
            )
        )
    out = hygiene.write_results(
        hygiene.results_name("conv_layers", ARGS.isa),
        dict(
            machine=hygiene.machine_record(
                CORES,
                torch=torch.__version__,
                threads=ARGS.threads,
                torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
                **hygiene.cpu_record(ARGS.isa),
            ),
            machine_state=machine_state,
            settings=dict(batch=ARGS.batch, calls=ARGS.calls, repeats=ARGS.repeats),
            rows=rows,
            total_ratio=totals,
            per_model_ratio=per_model,
        ),
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
