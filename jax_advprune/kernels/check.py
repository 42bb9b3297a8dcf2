"""Is the oneDNN convolution safe and right on this host? Seeded random convolutions against `lax.conv_general_dilated`.

    python -m jax_advprune.kernels.check [--cases 500] [--seed 0] [--devices 1,4] [--isa native,AVX2] [--checked]

Each case (batch 1-9; sizes 1-33, odd and even, not square; channels 1-67;
kernels 1, 3, 5, 7; strides 1-3 per axis; SAME, VALID, explicit asymmetric and,
now and then, negative paddings) checks on one XLA:CPU device or on several:
- the forward pass, the input and the kernel gradient of a nonlinear loss,
  oneDNN (`onednn.conv_general_dilated`) against `lax.conv_general_dilated`;
- on several devices, the same under `jit` with the batch sharded (the
  custom_partitioning path of the train step);
- the route: the compiled program holds the custom call exactly when
  `onednn.route` says oneDNN, and shapes the kernel refuses (negative paddings)
  are XLA's.
Cases run in child processes, a few at a time: a crash (or a sanitizer report)
fails the case it happened in, by name, and the next child goes on from the next
case. `--isa AVX2` caps oneDNN's instruction set (ONEDNN_MAX_CPU_ISA) to run the
AVX2 kernels on an AVX-512 host. `--checked` runs everything with the checked
build (AddressSanitizer + UndefinedBehaviorSanitizer, and oneDNN's buffers
against guard pages, see onednn.py) after a positive control: the overrun the
default build refuses, let through, must be reported. Prints a table and the
count of sanitizer reports; writes JSON with --out. Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np

from jax_advprune.children import die_with_parent
from jax_advprune.cpu import cpu_info

KERNELS = (1, 3, 5, 7)
DIMENSIONS = ("NHWC", "HWIO", "NHWC")
SANITIZER_MARKERS = (
    "ERROR: AddressSanitizer",
    "runtime error:",
    "ERROR: UndefinedBehaviorSanitizer",
    "ERROR: LeakSanitizer",
)
# The shapes the overrun was seen on (1x1, stride 2, fewer input channels than a SIMD block): the fixed subset
# always holds them.
KNOWN_OVERRUNS = ((4, 8, 8, 5, 7), (4, 8, 8, 4, 6), (9, 20, 26, 2, 59))


@dataclasses.dataclass(frozen=True)
class Case:
    """One convolution: x (batch, height, width, cin) * w (kernel, kernel, cin, cout)."""

    batch: int
    height: int
    width: int
    cin: int
    cout: int
    kernel: int
    strides: tuple
    padding: str | tuple  # "SAME" | "VALID" | ((top, bottom), (left, right))

    @property
    def name(self) -> str:
        pad = self.padding if isinstance(self.padding, str) else "p" + "_".join(f"{lo}.{hi}" for lo, hi in self.padding)
        return (
            f"n{self.batch}_{self.height}x{self.width}_c{self.cin}-{self.cout}_k{self.kernel}"
            f"_s{self.strides[0]}x{self.strides[1]}_{pad}"
        )

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Case:
        padding = d["padding"] if isinstance(d["padding"], str) else tuple(tuple(p) for p in d["padding"])
        return cls(**{**d, "strides": tuple(d["strides"]), "padding": padding})


def _output_sizes(case: Case) -> tuple[int, int]:
    from jax import lax

    pads = (
        lax.padtype_to_pads((case.height, case.width), (case.kernel,) * 2, case.strides, case.padding)
        if isinstance(case.padding, str)
        else case.padding
    )
    return tuple(
        (size + lo + hi - case.kernel) // s + 1
        for size, (lo, hi), s in zip((case.height, case.width), pads, case.strides)
    )


def random_case(rng: np.random.Generator) -> Case:
    """A case with a non-empty output (drawn again until it has one)."""
    while True:
        kernel = int(rng.choice(KERNELS))
        strides = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        kind = rng.choice(["SAME", "VALID", "explicit", "explicit", "negative"], p=[0.3, 0.2, 0.2, 0.2, 0.1])
        if kind == "explicit":
            padding = tuple((int(rng.integers(0, kernel + 1)), int(rng.integers(0, kernel + 1))) for _ in range(2))
        elif kind == "negative":
            padding = tuple((int(rng.integers(-2, kernel)), int(rng.integers(-2, 1))) for _ in range(2))
        else:
            padding = str(kind)
        case = Case(
            int(rng.integers(1, 10)),
            int(rng.integers(1, 34)),
            int(rng.integers(1, 34)),
            int(rng.integers(1, 68)),
            int(rng.integers(1, 68)),
            kernel,
            strides,
            padding,
        )
        if min(_output_sizes(case)) >= 1:
            return case


def random_cases(count: int, seed: int) -> list[Case]:
    rng = np.random.default_rng(seed)
    return [random_case(rng) for _ in range(count)]


def fixed_subset(count: int = 45) -> list[Case]:
    """The suite's cases: the known overrun shapes, then `count` random ones of seed 2026."""
    known = [Case(n, h, w, cin, cout, 1, (2, 2), "SAME") for n, h, w, cin, cout in KNOWN_OVERRUNS]
    return known + random_cases(count, 2026)


# ---- in the child process -------------------------------------------------------------------------------------


def _close(name: str, got, expected) -> None:
    expected = np.asarray(expected, np.float64)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=2e-4, atol=2e-4 * scale, err_msg=name)


def check_case(case: Case) -> str:
    """Runs the checks of one case in this process; returns the route taken; raises AssertionError on a mismatch."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from jax_advprune import parallel
    from jax_advprune.kernels import onednn

    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    x = jnp.asarray(rng.standard_normal((case.batch, case.height, case.width, case.cin), np.float32))
    w = jnp.asarray(
        rng.standard_normal((case.kernel, case.kernel, case.cin, case.cout), np.float32)
        / np.sqrt(case.kernel**2 * case.cin)
    )
    convs = (onednn.conv_general_dilated, lax.conv_general_dilated)

    def loss_of(conv, rows=None):
        """A nonlinear scalar of the convolution of x[:rows] (gradients then depend on every output)."""
        return lambda x, w: jnp.sum(
            jnp.sin(conv(x[:rows], w, case.strides, case.padding, dimension_numbers=DIMENSIONS))
        )

    def both(x, w):
        return [
            (
                conv(x, w, case.strides, case.padding, dimension_numbers=DIMENSIONS),
                jax.grad(loss_of(conv), (0, 1))(x, w),
            )
            for conv in convs
        ]

    compiled = jax.jit(both).lower(x, w).compile()
    pads = onednn.explicit_padding(case.padding, (case.height, case.width), (case.kernel,) * 2, case.strides)
    chosen = onednn.route(tuple(x.shape), tuple(w.shape), case.strides, pads)
    has_call = onednn.TARGET in compiled.as_text()
    assert has_call == (chosen.backend == "oneDNN"), f"route {chosen} but custom call in the program: {has_call}"
    if any(p < 0 for pair in pads for p in pair):
        assert chosen.backend == "XLA", f"negative padding must go to XLA, got {chosen}"
    (y, (dx, dw)), (y_ref, (dx_ref, dw_ref)) = compiled(x, w)
    assert y.shape == y_ref.shape, (y.shape, y_ref.shape)
    for name, got, expected in (("forward", y, y_ref), ("input gradient", dx, dx_ref), ("kernel gradient", dw, dw_ref)):
        _close(name, got, expected)
    if jax.device_count() > 1:
        # The train step's form: jit with the batch sharded, custom_partitioning splits each call by rows. A batch that
        # does not divide over the devices is padded to one that does and cut inside (each call then sees it whole).
        mesh = parallel.make_mesh()
        padded = jnp.concatenate([x, jnp.zeros((-case.batch % mesh.size, *x.shape[1:]), x.dtype)])
        shardings = (parallel.batch_sharding(mesh), parallel.replicated(mesh))
        (value, (gx, gw)), (value_ref, (gx_ref, gw_ref)) = [
            jax.jit(jax.value_and_grad(loss_of(conv, case.batch), (0, 1)), in_shardings=shardings)(padded, w)
            for conv in convs
        ]
        for name, got, expected in (
            ("sharded loss", value, value_ref),
            ("sharded input gradient", gx, gx_ref),
            ("sharded kernel gradient", gw, gw_ref),
        ):
            _close(name, got, expected)
    return f"{chosen.backend}: {chosen.detail}" + (" (subsampled)" if chosen.subsampled else "")


def _worker(cases_path: str, report_path: str, start: int) -> None:
    """Runs cases[start:] in order, appending JSON lines to the report: 'start' before a case, its result after."""
    with open(cases_path) as f:
        cases = [Case.from_json(d) for d in json.load(f)]
    with open(report_path, "a") as report:

        def write(record):
            report.write(json.dumps(record) + "\n")
            report.flush()
            os.fsync(report.fileno())

        for index in range(start, len(cases)):
            write({"index": index, "status": "start"})
            began = time.perf_counter()
            try:
                route = check_case(cases[index])
                write({"index": index, "status": "ok", "route": route, "seconds": time.perf_counter() - began})
            except Exception as error:  # a wrong number or an error from the kernel: this case fails, the next runs
                write(
                    {
                        "index": index,
                        "status": "fail",
                        "message": f"{type(error).__name__}: {error}"[:2000],
                        "seconds": time.perf_counter() - began,
                    }
                )


# ---- in the parent --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    case: Case
    devices: int
    isa: str
    status: str  # ok | fail | crash | timeout | report (a sanitizer report in a child that went on)
    message: str = ""
    route: str = ""


def sanitizer_environment() -> dict:
    """The variables that run Python with the checked build: the ASan runtime (and libstdc++, whose exceptions ASan
    intercepts) preloaded; leak checks off (CPython's arenas are not leaks); UBSan stops at its first report."""
    preload = []
    for name in ("libasan.so", "libstdc++.so.6"):
        path = subprocess.run(
            [os.environ.get("CXX", "g++"), f"-print-file-name={name}"], capture_output=True, text=True
        ).stdout.strip()
        if not os.path.isabs(path) or not os.path.exists(path):
            raise RuntimeError(
                f"{name} not found by {os.environ.get('CXX', 'g++')} -print-file-name (install the compiler's sanitizer runtime)"
            )
        preload.append(os.path.realpath(path))
    return {
        "LD_PRELOAD": " ".join(preload),
        "ASAN_OPTIONS": "detect_leaks=0",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
        "JAX_ADVPRUNE_ONEDNN_BUILD": "checked",
    }


def _child_environment(devices: int, isa: str, extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "JAX_ADVPRUNE_CONV")}
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
        JAX_ADVPRUNE_CONV="onednn",
        **extra,
    )
    if isa != "native":
        env["ONEDNN_MAX_CPU_ISA"] = isa
    return env


def run_cases(
    cases: list[Case],
    *,
    devices: int,
    isa: str = "native",
    extra_env: dict | None = None,
    seconds_per_case: float = 120.0,
) -> list[Result]:
    """Every case in child processes (devices XLA:CPU devices, oneDNN capped at `isa`), restarting after a crash."""
    results: dict[int, Result] = {}
    with tempfile.TemporaryDirectory(prefix="onednn_check_") as tmp:
        cases_path, report_path = os.path.join(tmp, "cases.json"), os.path.join(tmp, "report.jsonl")
        with open(cases_path, "w") as f:
            json.dump([c.to_json() for c in cases], f)
        env = _child_environment(devices, isa, extra_env or {})
        start = 0
        while start < len(cases):
            cmd = [sys.executable, "-m", "jax_advprune.kernels.check", "--worker", cases_path, report_path, str(start)]
            try:
                proc = subprocess.run(
                    cmd,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60 + seconds_per_case * (len(cases) - start),
                    preexec_fn=die_with_parent(),
                )
                ended, output = proc.returncode, proc.stdout + proc.stderr
            except subprocess.TimeoutExpired as expired:
                ended, output = (
                    None,
                    (expired.stdout or b"").decode(errors="replace") + (expired.stderr or b"").decode(errors="replace"),
                )
            started = None
            with open(report_path) as f:
                for line in f:
                    record = json.loads(line)
                    if record["status"] == "start":
                        started = record["index"]
                    else:
                        results[record["index"]] = Result(
                            cases[record["index"]],
                            devices,
                            isa,
                            record["status"],
                            record.get("message", ""),
                            record.get("route", ""),
                        )
                        started = None
            reports = sum(output.count(marker) for marker in SANITIZER_MARKERS)
            if started is None and ended == 0:
                if reports:  # every case finished, yet a sanitizer reported (UBSan with recovery, say): fail them all
                    for index in range(start, len(cases)):
                        results[index] = Result(cases[index], devices, isa, "report", _tail(output))
                break
            if started is None:  # died between cases (start-up, say): the next case is blamed, the rest still run
                started = start if start not in results else max(results) + 1
                if started >= len(cases):
                    break
            status = "timeout" if ended is None else "report" if reports else "crash"
            how = "timed out" if ended is None else f"died: {_exit_text(ended)}"
            results[started] = Result(cases[started], devices, isa, status, f"{how}; {_tail(output)}")
            start = started + 1
    return [results[i] for i in range(len(cases)) if i in results]


def _exit_text(returncode: int) -> str:
    if returncode < 0:
        return f"signal {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


def _tail(output: str, lines: int = 25) -> str:
    kept = [line for line in output.splitlines() if not line.lstrip().startswith("#") or "in " not in line]
    return "\n".join(kept[-lines:])


def positive_control() -> Result:
    """The known overrun let through (unsafe-strided-1x1) under the checked build, AVX2 kernels, 4 devices: the
    checker must report it (a guard-page fault or a sanitizer report), or it could not see the bug it exists for."""
    env = {**sanitizer_environment(), "JAX_ADVPRUNE_ONEDNN_BUILD": "checked,unsafe-strided-1x1"}
    case = Case(4, 8, 8, 4, 6, 1, (2, 2), "SAME")
    [result] = run_cases([case], devices=4, isa="AVX2", extra_env=env)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=500, help="random cases per (devices, isa) pair")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--devices", default="1,4", help="comma-separated XLA:CPU device counts")
    parser.add_argument("--isa", default="native,AVX2", help="comma-separated oneDNN ISA caps (native = no cap)")
    parser.add_argument(
        "--checked", action="store_true", help="the sanitizer + guard-page build, after a positive control"
    )
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--worker", nargs=3, metavar=("CASES", "REPORT", "START"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker[0], args.worker[1], int(args.worker[2]))
        return 0
    began = time.perf_counter()
    extra = sanitizer_environment() if args.checked else {}
    control = None
    if args.checked:
        control = positive_control()
        seen = control.status in ("crash", "report") and (
            "AddressSanitizer" in control.message or "SEGV" in control.message
        )
        print(
            f"positive control (the known overrun let through): {'reported' if seen else 'NOT reported'} ({control.status})"
        )
        if not seen:
            print(control.message)
            return 1
    cases = random_cases(args.cases, args.seed)
    results: list[Result] = []
    for devices in (int(d) for d in args.devices.split(",")):
        for isa in args.isa.split(","):
            group = run_cases(cases, devices=devices, isa=isa, extra_env=extra)
            results += group
            counts = {s: sum(r.status == s for r in group) for s in ("ok", "fail", "crash", "timeout", "report")}
            routes = {}
            for r in group:
                backend = r.route.split(":")[0] + (" subsampled" if "subsampled" in r.route else "") if r.route else "?"
                routes[backend] = routes.get(backend, 0) + 1
            print(
                f"{devices} device(s), ISA {isa:>7}: "
                + ", ".join(f"{k} {v}" for k, v in counts.items())
                + f"; routes {routes}"
            )
    bad = [r for r in results if r.status != "ok"]
    for r in bad:
        print(f"FAILED {r.case.name} ({r.devices} devices, ISA {r.isa}): {r.status}: {r.message}")
    reports = sum(r.status == "report" for r in results)
    print(
        f"{len(results)} case runs ({len(cases)} shapes x {len(results) // max(1, len(cases))} groups), {len(bad)} failed, "
        f"{reports} sanitizer reports{' (checked build)' if args.checked else ''}, {time.perf_counter() - began:.0f} s"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "command": "python -m jax_advprune.kernels.check "
                    + " ".join(argv if argv is not None else sys.argv[1:]),
                    "cpu": cpu_info()[0],
                    "checked": args.checked,
                    "seed": args.seed,
                    "shapes": len(cases),
                    "seconds": round(time.perf_counter() - began, 1),
                    "positive_control": dataclasses.asdict(control) if control else None,
                    "results": [dict(dataclasses.asdict(r), name=r.case.name) for r in results],
                },
                f,
                indent=1,
            )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
