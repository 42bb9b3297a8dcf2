"""Measures the scratchpad overrun of oneDNN's strided 1x1 kernel-gradient convolution on oneDNN itself (the bug the
custom call routes around: docs/native.md), for every shape of a grid, per instruction set and thread count.

    python -m jax_advprune.kernels.overrun_probe [--out benchmarks/results/onednn_overrun.json]

Builds overrun_probe.cc with g++ against the oneDNN of the `[cpu]` extra, then runs it once per setting
(ONEDNN_MAX_CPU_ISA x OMP_NUM_THREADS), each in its own process. The probe gives each primitive a user scratchpad
of the size it asks for followed by a canary; a shape overruns when the canary is overwritten. Writes per setting
the shapes tried, those that overran, by how many bytes, and their channel counts and strides.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

from jax_advprune.cpu import cpu_info
from jax_advprune.kernels.onednn import onednn_prefix

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "overrun_probe.cc")
SETTINGS = (("AVX2", 1), ("AVX2", 2), ("AVX512_CORE", 1), ("AVX512_CORE", 2))


def shape_grid() -> list[tuple[int, ...]]:
    """(n, h, w, c, o, stride): batch 1/2/4, square inputs 4-16, 1-16 input channels, 1/8/16 output channels,
    strides 2 and 3: 1,728 shapes, every strided 1x1 kernel gradient with few channels the models or a user meet."""
    return [
        (n, h, h, c, o, s)
        for n, h, c, o, s in itertools.product((1, 2, 4), (4, 6, 8, 10, 12, 16), range(1, 17), (1, 8, 16), (2, 3))
    ]


def build(directory: str) -> str:
    prefix = onednn_prefix()
    binary = os.path.join(directory, "overrun_probe")
    cmd = [
        "g++",
        "-O2",
        "-std=c++17",
        f"-I{os.path.join(prefix, 'include')}",
        SOURCE,
        f"-L{os.path.join(prefix, 'lib')}",
        "-ldnnl",
        f"-Wl,-rpath,{os.path.join(prefix, 'lib')}",
        "-o",
        binary,
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return binary


def probe(binary: str, shapes: list[tuple[int, ...]], isa: str, threads: int, stall_s: float = 20.0) -> dict:
    """One setting: every shape through the probe -> a summary with each overrunning shape. A shape on which oneDNN
    does not return within `stall_s` (seen with 2 threads: it hangs) is recorded as hung and the probe restarts after it."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=isa, OMP_NUM_THREADS=str(threads))
    started = time.perf_counter()
    lines, hung, todo = [], [], list(shapes)
    while todo:
        text = "\n".join(" ".join(map(str, shape)) for shape in todo) + "\n"
        try:
            proc = subprocess.run(
                [binary], input=text, env=env, capture_output=True, text=True, timeout=stall_s + 0.01 * len(todo)
            )
            out, failed = proc.stdout, proc.returncode != 0
        except subprocess.TimeoutExpired as error:
            out = error.stdout.decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
            failed = True
        done = [line for line in out.splitlines() if line.strip()]
        lines += done
        todo = todo[len(done) :]
        if failed and todo:
            hung.append(list(todo[0]))
            todo = todo[1:]
    overruns, implementations = [], set()
    for line in lines:
        n, h, w, c, o, s, pad, over, *impl = line.split()
        implementations.add(" ".join(impl))
        if int(over):
            overruns.append(
                {
                    "n": int(n),
                    "h": int(h),
                    "c": int(c),
                    "o": int(o),
                    "stride": int(s),
                    "scratchpad_bytes": int(pad),
                    "overrun_bytes": int(over),
                }
            )
    return {
        "isa": isa,
        "threads": threads,
        "shapes": len(shapes),
        "seconds": round(time.perf_counter() - started, 1),
        "implementations": sorted(implementations),
        "overruns": overruns,
        "hung": hung,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "onednn_overrun.json"))
    args = parser.parse_args(argv)
    shapes = shape_grid()
    with tempfile.TemporaryDirectory() as directory:
        binary = build(directory)
        results = []
        for isa, threads in SETTINGS:
            results.append(probe(binary, shapes, isa, threads))
            r = results[-1]
            print(
                f"ISA {isa}, {threads} thread(s): {len(r['overruns'])} of {r['shapes']} shapes overran, {len(r['hung'])} hung "
                f"({', '.join(r['implementations'])}), {r['seconds']} s",
                flush=True,
            )
    with open(args.out, "w") as f:
        json.dump(
            {"command": "python -m jax_advprune.kernels.overrun_probe", "cpu": cpu_info()[0], "settings": results},
            f,
            indent=1,
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
