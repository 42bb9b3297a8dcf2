"""Before you rent a pod: compile every program of a run for a TPU topology on this CPU, and estimate what it costs.

    python -m jax_advprune.plan --config configs/<x>.py[:variant] --topology v5e:8x8 [--config.x=y ...]
        [--synthetic_size 20000000] [--original_size 50000] [--test_size 10000] [--deepfool_iterations 5]
        [--utilisation auto|0.4] [--bisect train|all|none] [--programs 'train step,DeepFool'] [--out plan.json]
    python -m jax_advprune.plan --restate plan.json --utilisation 0.5 [--restate_reason '...'] --out restated.json

With libtpu installed (the `[plan]` extra), `jax.experimental.topologies` describes
real TPU topologies on a machine without a TPU, and the TPU compiler runs here. For
each program a run executes (the scoring model's training step, DeepFool over a
scoring chunk, the embedding and the JAX kNN engine, the final TRADES/PGD-AT step,
validation PGD, and the evaluation attacks: PGD, APGD-CE, APGD-T, FAB-T, Square),
built by the same code the run uses (`training.make_train_step`,
`attacks.dispatch.attack_program`, `evaluation.pgd_program`, ...) on a mesh of the
topology's chips, in the form `backends` picks for a TPU (loop bodies, the DeepFool
while loop, XLA's convolutions, 'auto' compute dtype in bf16), it reports:

- compiled or not (the compiler's error in one line), and the compile seconds;
- HBM per chip (arguments + outputs + temporaries, `memory_analysis`) against the
  chip's capacity, and the largest per-chip batch that fits, by bisection on
  compiles (the TPU compiler itself refuses a program that does not fit);
- FLOPs and HBM bytes per image, and the collectives per call with their bytes;
- a roofline time per call, max(FLOPs / peak, bytes / bandwidth) per chip, from
  CHIPS (published peaks, sources named);
- that the program holds no CPU custom call, host callback or float64 value, and
  that the same program lowers for CUDA GPUs (`jax.export`, platforms=['cuda']).

XLA's cost analysis counts a loop body once, so every loop program is also compiled
as two cost probes, its loop run once and twice, unrolled: the difference is one
iteration, and the cost of a call is probe(1) + (n - 1) x (probe(2) - probe(1)).
DeepFool's while loop runs a data-dependent number of steps: its cost is the
queue-step program's times the steps that `--deepfool_iterations` (mean DeepFool
iterations per sample, an assumption the output states) implies. Square's queries
are costed as one forward pass of the chunk each.

Then the hours of each phase for the whole run (pool sizes from the flags, epochs,
batches and steps from the config) at roofline and at a utilisation: `auto`
calibrates it on this CPU, as the measured time of the configured train step here
(at a small batch, XLA's convolutions, the CPU's form) against its roofline here
(peak FLOP/s and memory bandwidth measured by a matmul and a copy); a number sets it.
These are estimates from a compiler and published peaks, not measurements on a TPU.

A config whose train step does not fit the chips is refused (exit status 3) with the
compiler's reason and the largest per-chip batch that would fit. Writes plan.json
(or --out) after each program, with `"complete": false` and the programs still to
compile until the last one is done. `--restate` re-states a written plan's hours at
another utilisation without compiling again.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.tree_util import Partial

from jax_advprune import backends, parallel, training, validate
from jax_advprune.attacks.autoattack import TARGETED, _predict, component, components
from jax_advprune.attacks.deepfool import BISECTION_ROWS, _deepfool_loop, queue_programs
from jax_advprune.attacks.dispatch import attack_program, split_dynamic
from jax_advprune.evaluation import pgd_program
from jax_advprune.phases import score as score_phase
from jax_advprune.phases.common import apply_fn, build_model, features_fn
from jax_advprune.pruning import knn as knn_lib
from jax_advprune.pruning import predictions

EXIT_DOES_NOT_FIT = 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures: bf16 peak FLOP/s, HBM bytes, HBM bytes/s, and where they are published.

    TPUs have no float32 matrix unit: at JAX's default precision a float32 matmul or
    convolution is one bf16 pass (the bf16 peak applies); at precision 'highest' it
    is six (`f32_highest_flops`)."""

    name: str
    bf16_flops: float
    hbm_bytes: float
    hbm_bandwidth: float
    source: str

    @property
    def f32_highest_flops(self) -> float:
        return self.bf16_flops / 6


CHIPS = {
    "v4": Chip("TPU v4", 275e12, 32 * 2**30, 1200e9, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 197e12, 16e9, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 459e12, 95e9, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", 918e12, 32e9, 1638e9, "https://cloud.google.com/tpu/docs/v6e"),
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "bf16": 2,
    "f16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}


class PlanError(RuntimeError):
    """The plan cannot be made here (no libtpu, an unknown topology); the message says why."""


# ---------------------------------------------------------------- topology


def topology_mesh(name: str) -> tuple[Mesh, Chip, int]:
    """(a DATA_AXIS mesh over every chip of TPU topology `name`, e.g. 'v5e:2x4', its Chip, its host count)."""
    family = name.split(":")[0]
    if family not in CHIPS:
        raise PlanError(f"unknown TPU family {family!r} in {name!r}; known: {sorted(CHIPS)} (e.g. v5e:2x4, v5p:2x2x1)")
    # plan only compiles: several processes may load libtpu at once (two plans, or a test and the command it runs);
    # without this, the second one fails on libtpu's lock file
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies

        description = topologies.get_topology_desc(topology_name=name, platform="tpu")
    except Exception as error:  # no libtpu, or a shape the runtime does not know
        raise PlanError(
            f"cannot describe TPU topology {name!r}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''} "
            "(plan needs libtpu: pip install -e '.[plan]')"
        ) from error
    devices = list(description.devices)
    hosts = len({d.process_index for d in devices})
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))  # parallel.make_mesh's order: process by process
    return Mesh(np.asarray(ordered), (parallel.DATA_AXIS,)), CHIPS[family], hosts


def _placed(tree: Any, sharding) -> Any:
    """Abstract arrays (anything with shape and dtype) -> ShapeDtypeStructs with `sharding`."""
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


# ---------------------------------------------------------------- compiling and reading a program


@dataclasses.dataclass
class Compiled:
    """What the compiler says of one program at one batch: per-chip bytes and costs, collectives, or its error."""

    ok: bool
    seconds: float
    error: str = ""
    argument_bytes: int = 0
    output_bytes: int = 0
    temp_bytes: int = 0
    flops: float = 0.0
    bytes_accessed: float = 0.0
    collectives: dict = dataclasses.field(default_factory=dict)  # kind -> [count, bytes]
    hygiene: dict = dataclasses.field(default_factory=dict)

    @property
    def hbm_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes


def _shape_bytes(text: str) -> int:
    """Bytes of an HLO result shape such as 'f32[64,10]{1,0}' or '(f32[64], bf16[3,3])'."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]", text):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def collectives_of(hlo: str) -> dict[str, list]:
    """{kind: [count, bytes of the results]} of the collective operations in HLO text (each op once, loop bodies once)."""
    found: dict[str, list] = {}
    for line in hlo.splitlines():
        match = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(", line)
        if match:
            entry = found.setdefault(match.group(2), [0, 0])
            entry[0] += 1
            entry[1] += _shape_bytes(match.group(1))
    return found


def _is_cpu_call(target: str) -> bool:
    """A custom-call target that exists on the CPU only (the project's oneDNN convolution)."""
    return "jax_advprune" in target or "onednn" in target


def _is_host_callback(target: str) -> bool:
    return "callback" in target


def hygiene_of(hlo: str) -> dict:
    """What must not be in an accelerator program: CPU custom calls (oneDNN), host callbacks, float64 values."""
    targets = sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))
    return {
        "custom_call_targets": targets,
        "cpu_custom_calls": [t for t in targets if _is_cpu_call(t)],
        "host_callbacks": [t for t in targets if _is_host_callback(t)],
        "f64": bool(re.search(r"\bf64\[", hlo)),
    }


def compile_program(jitted, args: tuple, effort: float = 0.0) -> Compiled:
    """Lowers and compiles `jitted` on abstract `args` (ShapeDtypeStructs placed on the TPU mesh); never raises.

    `effort`: the compiler's execution-time optimisation effort, -1.0 to 1.0 (0: its default, what a run gets).
    At -1 the TPU compiler takes about half the time on the small models and reports several times the temporary
    memory: a check that a program compiles, not a memory or cost figure for the run."""
    started = time.perf_counter()
    try:
        lowered = jitted.lower(*args)
        key = _compile_key(lowered, args, effort)
        if key in _COMPILED:
            return _COMPILED[key]
        compiled = lowered.compile(compiler_options={"exec_time_optimization_effort": effort} if effort else None)
    except Exception as error:  # the compiler's refusal (out of memory, unsupported op) is a result, not a crash
        text = " ".join(str(error).split())
        return Compiled(False, time.perf_counter() - started, error=f"{type(error).__name__}: {text[:400]}")
    seconds = time.perf_counter() - started
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    hlo = compiled.as_text()
    _COMPILED[key] = Compiled(
        True,
        seconds,
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        collectives=collectives_of(hlo),
        hygiene=hygiene_of(hlo),
    )
    return _COMPILED[key]


_COMPILED: dict[tuple, Compiled] = {}  # compile_program's results in this process, by _compile_key


def _compile_key(lowered, args: tuple, effort: float) -> tuple:
    """What decides a compile's result: the lowered module's text, the devices its arguments are placed on (id, kind
    and host of each, in mesh order) and the effort. A program compiled twice in one process (a cost probe of a
    program without a loop is the program itself; configs share their evaluation programs) is compiled once."""
    meshes = {
        leaf.sharding.mesh
        for leaf in jax.tree.leaves(args)
        if isinstance(getattr(leaf, "sharding", None), jax.sharding.NamedSharding)
    }
    placement = tuple(
        sorted(
            (m.axis_names, m.devices.shape, tuple((d.id, d.device_kind, d.process_index) for d in m.devices.flat))
            for m in meshes
        )
    )
    return hashlib.sha256(lowered.as_text().encode()).hexdigest(), placement, effort


def gpu_lowering(jitted, args: tuple) -> str:
    """'ok', or the error in one line, of lowering `jitted` on `args` for CUDA GPUs with `jax.export` (StableHLO
    only: no CUDA toolkit or GPU is needed), and no CPU custom call or host callback in the exported module."""
    from jax import export

    try:
        with backends.building_for("gpu"):
            exported = export.export(getattr(jitted, "jitted", jitted), platforms=["cuda"])(*args)
    except Exception as error:
        return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
    text = exported.mlir_module()
    targets = sorted(set(re.findall(r'stablehlo\.custom_call @([\w.$-]+)|call_target_name = "([^"]+)"', text)))
    names = sorted({a or b for a, b in targets})
    bad = [t for t in names if _is_cpu_call(t) or _is_host_callback(t)]
    return "ok" if not bad else f"exported, with CPU-only calls: {bad}"


# ---------------------------------------------------------------- the programs of a run


@dataclasses.dataclass
class Program:
    """One program of a run: how to build it at a global batch, and how many times each phase calls it.

    build(batch, loop=None) -> (jitted, abstract args): loop=None is the program the run
    executes; loop=n builds the cost probe whose loop runs n times, unrolled.
    `loop_count`: iterations of the loop in the real program (0: no loop); `cost_from`:
    for DeepFool, 'queue_step' (costs come from the one-step program times `steps`).
    `calls`: {phase: calls}. `images_per_call`: the images one call processes.
    """

    name: str
    phase: str
    batch: int
    build: Callable[..., tuple]
    calls: dict
    loop_count: int = 0
    images_per_call: int | None = None
    notes: str = ""
    per_call_scale: float = 1.0  # e.g. DeepFool: queue steps per chunk


def image_shape_of(config) -> tuple[int, int, int]:
    """The pool's image shape as the config implies it without reading files: digits (S, S, 1), generated data its
    configured shape, every other source CIFAR's (32, 32, 3)."""
    if config.data.name == "digits":
        return (config.data.image_size, config.data.image_size, 1)
    if config.data.name == "generated":
        return tuple(config.data.generated_image_shape)
    return (32, 32, 3)


def _steps_per_epoch(config, original: int, rows: int) -> int:
    """The loader's epoch: ceil(len(original) / batch) batches when batches mix originals in, else one pass over rows."""
    batch = config.train.batch_size
    if config.train.original_fraction > 0 and original > 0:
        return -(-original // batch)
    return -(-rows // batch)


def run_programs(config, mesh: Mesh, sizes: dict, deepfool_iterations: float) -> list[Program]:
    """Every program the run of `config` executes on `mesh`, with its calls per phase, for pool `sizes`
    ({'original', 'synthetic', 'test'})."""
    tcfg, scfg, ecfg = config.train, config.scoring, config.eval
    replicated, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    image_shape = image_shape_of(config)
    original, synthetic, test = sizes["original"], sizes["synthetic"], sizes["test"]
    pool = original + synthetic
    programs: list[Program] = []
    eval_model = build_model(config)
    variables = _placed(
        jax.eval_shape(lambda: eval_model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)), train=False)),
        replicated,
    )
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)

    def images(batch, dtype=jnp.uint8):
        return jax.ShapeDtypeStruct((batch, *image_shape), dtype, sharding=split)

    def labels(batch):
        return jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=split)

    # The training step (the final run's, and the scoring model's when one is trained).
    def train_build(batch, loop=None):
        attack = config.attack.copy_and_resolve_references()
        if loop is not None:
            attack.steps = loop
        model = build_model(config, tcfg.compute_dtype)
        tx = training.make_optimizer(tcfg, 1000)
        step = training.make_train_step(model, tx, tcfg, attack, mesh, ema_from=training.ema_start(tcfg, 1000))
        state = _placed(
            jax.eval_shape(lambda: training.init_train_state(model, tx, image_shape, config.seed)), replicated
        )
        batch_args = {
            "image": images(batch),
            "label": labels(batch),
            "eps": jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=split),
        }
        return _Unrolled(step.jitted, loop is not None), (state, batch_args)

    epochs_steps = math.ceil(tcfg.epochs * _steps_per_epoch(config, original, pool))
    validation_size = int(tcfg.validation_size)
    validations = (
        math.ceil(epochs_steps / max(1, round(tcfg.validation_every_epochs * _steps_per_epoch(config, original, pool))))
        if validation_size
        else 0
    )
    calls = {"train": epochs_steps}
    scored = min(int(scfg.extrapolation.subset_size), synthetic) if scfg.extrapolation.enabled else synthetic + original
    needs_model = score_phase.needed(config) and scfg.score not in ("random",) and not scfg.init_from
    if needs_model:
        models = scfg.num_models if scfg.score in ("el2n", "grand") else 1
        calls["score"] = models * math.ceil(scfg.train_epochs * _steps_per_epoch(config, original, scored))
    programs.append(Program("train step", "train", tcfg.batch_size, train_build, calls, loop_count=config.attack.steps))

    # Validation PGD (model selection) and the evaluation's PGD.
    def pgd_build(steps, loss="ce"):
        def build(batch, loop=None):
            jitted = pgd_program(
                apply_fn(eval_model),
                eps=config.attack.eps,
                step_size=config.attack.eps * ecfg.step_fraction,
                steps=loop or steps,
                norm=config.attack.norm,
                mesh=mesh,
                loss=loss,
            )
            return _Unrolled(jitted, loop is not None), (variables, key, images(batch), labels(batch))

        return build

    if validations:
        programs.append(
            Program(
                f"validation PGD-{tcfg.validation_pgd_steps}",
                "train",
                ecfg.batch_size,
                pgd_build(tcfg.validation_pgd_steps, tcfg.validation_loss),
                {"train": validations * -(-validation_size // ecfg.batch_size)},
                loop_count=tcfg.validation_pgd_steps,
            )
        )
    weight_sets = 3 if validation_size else 2  # raw, EMA (and the best validation checkpoint)
    eval_batches = weight_sets * -(-test // ecfg.batch_size)
    programs.append(
        Program(
            f"evaluation PGD-{ecfg.pgd_steps}",
            "evaluate",
            ecfg.batch_size,
            pgd_build(ecfg.pgd_steps),
            {"evaluate": eval_batches},
            loop_count=ecfg.pgd_steps,
        )
    )

    # AutoAttack's components, each on at most the whole test split (an upper bound: a pass runs on the survivors).
    if ecfg.attack in ("autoattack", "autoattack_lite"):
        names = components("standard" if ecfg.attack == "autoattack" else "lite")
        targets = min(ecfg.apgd_targets, config.data.num_classes - 1)
        logits_tree = Partial(apply_fn(eval_model), variables)
        for name in names:
            impl, static = component(
                name,
                norm=config.attack.norm,
                apgd_steps=ecfg.apgd_steps,
                fab_steps=ecfg.fab_steps,
                square_queries=ecfg.square_queries,
            )
            dynamic = {"eps": config.attack.eps} | ({"rank": 2} if name in TARGETED else {})
            loops = {"apgd-ce": ecfg.apgd_steps, "apgd-t": ecfg.apgd_steps, "fab-t": ecfg.fab_steps}.get(name, 0)

            def aa_build(batch, loop=None, impl=impl, static=static, dynamic=dynamic, name=name):
                settings = dict(static)
                if loop is not None and name != "square":
                    settings.update(steps=loop, unroll=True)
                shared_names, batched_names = split_dynamic(dynamic)
                jitted = attack_program(impl, mesh, shared_names, batched_names, tuple(sorted(settings.items())))
                shared = [
                    jax.ShapeDtypeStruct((), jnp.asarray(dynamic[n]).dtype, sharding=replicated) for n in shared_names
                ]
                return jitted, (logits_tree, key, *shared, images(batch, jnp.float32), labels(batch))

            passes = targets if name in TARGETED else 1
            programs.append(
                Program(
                    f"AutoAttack {name}",
                    "evaluate",
                    ecfg.batch_size,
                    aa_build,
                    {"evaluate": passes * eval_batches},
                    loop_count=loops,
                    notes="upper bound: every pass on every test image",
                )
            )
        if "square" in names:  # its while loop is costed as one forward pass of the chunk per query
            programs.append(
                Program(
                    "Square queries (as forward passes)",
                    "evaluate",
                    ecfg.batch_size,
                    _forward_build(eval_model, variables, mesh, images, labels),
                    {"evaluate": ecfg.square_queries * eval_batches},
                    notes=f"{ecfg.square_queries} queries per pass, each one forward pass",
                )
            )

    # Scoring: DeepFool margins, history predictions, embedding + kNN.
    if score_phase.needed(config) and scfg.score == "margin":
        d = scfg.deepfool
        per_chip_slots = scfg.slots // mesh.size
        settings = dict(
            norm=d.norm,
            max_iter=d.max_iter,
            overshoot=d.overshoot,
            candidates=d.candidates or None,
            form=d.form,
            search_steps=d.search_steps,
        )
        logits_tree = Partial(apply_fn(eval_model), variables)

        def deepfool_build(batch, loop=None):
            if loop is None:  # the run's program: the queue inside one while loop over a chunk
                jitted = attack_program(
                    _deepfool_loop, mesh, (), (), tuple(sorted(dict(settings, slots=per_chip_slots).items()))
                )
                return jitted, (logits_tree, None, images(batch), labels(batch))
            start, advance, _ = queue_programs(mesh, per_chip_slots, loop, **settings)
            queue = jax.eval_shape(start, logits_tree, images(batch))
            return advance, (logits_tree, images(batch), _placed(queue, split))

        steps_per_chunk = math.ceil(scfg.chunk_size * (deepfool_iterations + 1) / scfg.slots)
        programs.append(
            Program(
                "DeepFool (chunk: while loop; cost: queue steps)",
                "score",
                scfg.chunk_size,
                deepfool_build,
                {"score": math.ceil(scored / scfg.chunk_size)},
                loop_count=-1,
                per_call_scale=steps_per_chunk,
                images_per_call=scfg.chunk_size,
                notes=f"{deepfool_iterations:g} DeepFool iterations per sample assumed (+1 step to finish); "
                f"{scfg.slots} slots; max_iter {d.max_iter}",
            )
        )
        if d.form == "dm_improves_at" and d.search_steps:  # inside the chunk's program; costed as forward passes
            bisection_batch = BISECTION_ROWS * mesh.size
            programs.append(
                Program(
                    "DeepFool bisection (as forward passes)",
                    "score",
                    bisection_batch,
                    _forward_build(eval_model, variables, mesh, images, labels),
                    {"score": d.search_steps * math.ceil(scored / bisection_batch)},
                    notes=f"{d.search_steps} halvings per sample, each one forward pass",
                )
            )
    if score_phase.needed(config) and (
        scfg.score in score_phase.HISTORY_SCORES or scfg.extrapolation.enabled or scfg.score in ("el2n",)
    ):
        predict = predictions.predict_program(features_fn(eval_model), mesh, None)
        history_epochs = math.ceil(scfg.train_epochs) if scfg.score in score_phase.HISTORY_SCORES else 0
        embed_calls = math.ceil(pool / scfg.chunk_size) if scfg.extrapolation.enabled else 0
        programs.append(
            Program(
                "predictions / embedding",
                "score",
                scfg.chunk_size,
                lambda batch, loop=None: (predict, (variables, key, images(batch), labels(batch))),
                {"score": history_epochs * math.ceil(scored / scfg.chunk_size) + embed_calls},
            )
        )
        if scfg.extrapolation.enabled:
            dim = jax.eval_shape(
                lambda v, x: features_fn(eval_model)(v, x)[1],
                variables,
                jax.ShapeDtypeStruct((1, *image_shape), jnp.float32),
            ).shape[-1]
            ext = scfg.extrapolation
            ref_chunk = min(16384, scored)
            blocks = -(-scored // ref_chunk)

            def knn_build(batch, loop=None):
                n_blocks = loop or blocks
                jitted = knn_lib.search_program(k=ext.k, ref_chunk=ref_chunk, metric=ext.metric, mesh=mesh)
                refs = (
                    jax.ShapeDtypeStruct((n_blocks, ref_chunk, dim), jnp.float32, sharding=replicated),
                    jax.ShapeDtypeStruct((n_blocks, ref_chunk), jnp.float32, sharding=replicated),
                    jax.ShapeDtypeStruct((n_blocks, ref_chunk), jnp.bool_, sharding=replicated),
                    jax.ShapeDtypeStruct((n_blocks,), jnp.int32, sharding=replicated),
                )
                return jitted, (*refs, jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=split))

            query_chunk = 4096 - 4096 % mesh.size or mesh.size
            programs.append(
                Program(
                    f"kNN (JAX engine, k={ext.k}, {scored:,} references)",
                    "score",
                    query_chunk,
                    knn_build,
                    {"score": math.ceil(pool / query_chunk)},
                    loop_count=blocks,
                )
            )
    return programs


class _Unrolled:
    """A jitted program whose tracing happens with every attack loop unrolled when `unrolled` (cost probes)."""

    def __init__(self, jitted, unrolled: bool):
        self.jitted, self.unrolled = jitted, unrolled

    def lower(self, *args):
        with backends.forcing_unroll(self.unrolled):
            return self.jitted.lower(*args)


def _forward_build(model, variables, mesh, images, labels):
    def build(batch, loop=None):
        jitted = attack_program(_predict, mesh, (), (), ())
        return jitted, (Partial(apply_fn(model), variables), None, images(batch, jnp.float32), labels(batch))

    return build


# ---------------------------------------------------------------- costing


@dataclasses.dataclass
class ProgramReport:
    name: str
    phase: str
    global_batch: int
    per_chip_batch: int
    compiled: bool
    error: str
    compile_seconds: float
    hbm_bytes: int
    hbm_capacity: float
    fits: bool
    max_per_chip_batch: int | None
    flops_per_call: float
    bytes_per_call: float
    flops_per_image: float
    bytes_per_image: float
    collectives_per_call: dict
    roofline_seconds_per_call: float
    bound: str
    calls: dict
    hours_roofline: dict
    hygiene: dict
    gpu_lowering: str = ""
    notes: str = ""


def _probe_costs(program: Program, batch: int, effort: float = 0.0) -> tuple[float, float, dict]:
    """(FLOPs, bytes, collectives) of one call of `program` per chip, from cost probes where it loops."""
    if not program.loop_count:
        jitted, args = program.build(batch)
        c = compile_program(jitted, args, effort)
        return c.flops, c.bytes_accessed, c.collectives
    one, two = (compile_program(*program.build(batch, loop=n), effort) for n in (1, 2))
    if not (one.ok and two.ok):
        raise PlanError(f"cost probes of {program.name} did not compile: {one.error or two.error}")
    if program.loop_count < 0:  # DeepFool: queue steps, counted by per_call_scale
        per_step = (two.flops - one.flops, two.bytes_accessed - one.bytes_accessed)
        collectives = {
            k: [v[0] * program.per_call_scale, v[1] * program.per_call_scale]
            for k, v in _difference(two.collectives, one.collectives).items()
        }
        return per_step[0] * program.per_call_scale, per_step[1] * program.per_call_scale, collectives
    n = program.loop_count
    flops = one.flops + (n - 1) * (two.flops - one.flops)
    accessed = one.bytes_accessed + (n - 1) * (two.bytes_accessed - one.bytes_accessed)
    collectives = {}
    for kind in set(one.collectives) | set(two.collectives):
        a, b = one.collectives.get(kind, [0, 0]), two.collectives.get(kind, [0, 0])
        collectives[kind] = [a[0] + (n - 1) * (b[0] - a[0]), a[1] + (n - 1) * (b[1] - a[1])]
    return flops, accessed, collectives


def _difference(b: dict, a: dict) -> dict:
    return {
        k: [b.get(k, [0, 0])[0] - a.get(k, [0, 0])[0], b.get(k, [0, 0])[1] - a.get(k, [0, 0])[1]]
        for k in set(a) | set(b)
    }


MAX_PER_CHIP_BATCH = 2048  # the search stops here: a larger per-chip batch is not a CIFAR training setting


def largest_fitting_batch(
    program: Program, chips: int, chip: Chip, known: dict[int, Compiled], effort: float = 0.0
) -> int | None:
    """The largest per-chip batch up to MAX_PER_CHIP_BATCH (or below a batch known not to fit) whose program compiles
    and fits the chip's HBM, within about 6%; None when even 1 does not. Memory is close to linear in the batch, so
    two batches that fit give a line and the line a candidate; the candidate and 6% above it are compiled, and
    bisection between what fits and what does not finishes when the line was wrong. `known` caches compiles by
    per-chip batch (each compile of a large model takes minutes on a small CPU)."""

    def fits(per_chip: int) -> bool:
        if per_chip not in known:
            known[per_chip] = compile_program(*program.build(per_chip * chips), effort)
        c = known[per_chip]
        return c.ok and c.hbm_bytes <= chip.hbm_bytes

    def bounds() -> tuple[int, int | None]:
        fitting = [b for b in known if fits(b)]
        failing = [b for b in known if not fits(b)]
        return max(fitting, default=0), min(failing, default=None)

    low, high = bounds()
    if low == 0:
        if (high is not None and high <= 1) or not fits(1):
            return None
        low, high = bounds()
    ceiling = MAX_PER_CHIP_BATCH if high is None else high - 1
    fitting = sorted(b for b in known if fits(b))
    if len(fitting) == 1 and min(2 * low, ceiling) > low:
        fits(min(2 * low, ceiling))
        low, high = bounds()
        fitting = sorted(b for b in known if fits(b))
    ceiling = MAX_PER_CHIP_BATCH if high is None else high - 1
    if len(fitting) >= 2 and ceiling > low:
        a, b = fitting[-2], fitting[-1]
        slope = (known[b].hbm_bytes - known[a].hbm_bytes) / (b - a)
        guess = ceiling if slope <= 0 else int(b + (chip.hbm_bytes - known[b].hbm_bytes) / slope)
        guess = max(low + 1, min(guess, ceiling))
        if fits(guess):
            above = min(ceiling, int(guess * 1.06) + 1)
            if above > guess:
                fits(above)
        low, high = bounds()
    while high is None and low < MAX_PER_CHIP_BATCH:  # the line fell short: double until something does not fit
        fits(min(2 * low, MAX_PER_CHIP_BATCH))
        low, high = bounds()
    while high is not None and high - low > max(1, low // 16):
        fits((low + high) // 2)
        low, high = bounds()
    return low


def report_program(
    program: Program, mesh: Mesh, chip: Chip, bisect: bool, costs: bool = True, effort: float = 0.0
) -> ProgramReport:
    """Compiles `program` at its batch (and, with `bisect`, at others), and with `costs` its cost probes, at the
    compiler's `effort` (see `compile_program`)."""
    chips = mesh.size
    per_chip = max(1, program.batch // chips)
    jitted, args = program.build(program.batch)
    main = compile_program(jitted, args, effort)
    gpu = gpu_lowering(jitted, args)
    known = {per_chip: main}
    fits = main.ok and main.hbm_bytes <= chip.hbm_bytes
    largest = largest_fitting_batch(program, chips, chip, known, effort) if bisect or not fits else None
    images = program.images_per_call or program.batch
    if main.ok and costs:
        flops, accessed, collectives = _probe_costs(program, program.batch, effort)
    else:
        flops, accessed, collectives = 0.0, 0.0, {}
    roofline = max(flops / chip.bf16_flops, accessed / chip.hbm_bandwidth)
    hours = {phase: calls * roofline / 3600 for phase, calls in program.calls.items()}
    return ProgramReport(
        name=program.name,
        phase=program.phase,
        global_batch=program.batch,
        per_chip_batch=per_chip,
        compiled=main.ok,
        error=main.error,
        compile_seconds=main.seconds,
        hbm_bytes=main.hbm_bytes,
        hbm_capacity=chip.hbm_bytes,
        fits=fits,
        max_per_chip_batch=largest,
        flops_per_call=flops,
        bytes_per_call=accessed,
        flops_per_image=flops * chips / images,
        bytes_per_image=accessed * chips / images,
        collectives_per_call=collectives,
        roofline_seconds_per_call=roofline,
        bound="compute" if flops / chip.bf16_flops >= accessed / chip.hbm_bandwidth else "memory",
        calls=program.calls,
        hours_roofline=hours,
        hygiene=main.hygiene,
        gpu_lowering=gpu,
        notes=program.notes,
    )


# ---------------------------------------------------------------- calibration on this CPU


def cpu_peaks(mesh: Mesh, seconds: float = 1.0) -> dict:
    """This CPU's float32 matmul FLOP/s and memory bytes/s, measured on every device of `mesh` at once (a matmul of
    1024 x 1024 per device, and a pass over 64 MiB per device)."""

    def rate(fn, args, work):
        jax.block_until_ready(fn(*args))
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or runs < 3:
            jax.block_until_ready(fn(*args))
            runs += 1
        return work * runs / (time.perf_counter() - started)

    split = parallel.batch_sharding(mesh)
    n = 1024
    a = jax.device_put(np.random.default_rng(0).standard_normal((mesh.size * n, n), np.float32), split)
    b = jax.device_put(np.random.default_rng(1).standard_normal((n, n), np.float32), parallel.replicated(mesh))
    matmul = jax.jit(lambda a, b: a @ b, out_shardings=split)
    big = jax.device_put(np.ones((mesh.size * 16 * 2**20,), np.float32), split)
    stream = jax.jit(lambda x: x * 1.0001 + 1.0, out_shardings=split)
    return {"flops": rate(matmul, (a, b), 2.0 * mesh.size * n**3), "bytes": rate(stream, (big,), 2.0 * big.size * 4)}


def calibrate_utilisation(config, per_device_batch: int = 2, steps: int = 3) -> dict:
    """The utilisation this CPU reaches on the configured train step: roofline time here / measured time.

    The step as the run builds it on this machine's devices (the CPU's form: unrolled attack), with XLA's
    convolutions (the oneDNN custom call has no cost in XLA's analysis), at `per_device_batch` images per device;
    the roofline from its cost analysis and `cpu_peaks`. Returns the figures behind the ratio."""
    from jax_advprune.kernels import onednn

    mesh = parallel.make_mesh()
    previous = onednn.get_backend()
    onednn.set_backend("xla")
    try:
        tcfg = config.train
        model = build_model(config, "float32")
        tx = training.make_optimizer(tcfg, 1000)
        image_shape = image_shape_of(config)
        state = jax.device_put(
            training.init_train_state(model, tx, image_shape, config.seed), parallel.replicated(mesh)
        )
        step = training.make_train_step(model, tx, tcfg, config.attack, mesh, ema_from=training.ema_start(tcfg, 1000))
        batch = per_device_batch * mesh.size
        rng = np.random.default_rng(0)
        host_batch = {
            "image": rng.integers(0, 256, (batch, *image_shape), dtype=np.uint8),
            "label": rng.integers(0, 10, batch).astype(np.int32),
            "eps": np.full(batch, config.attack.eps, np.float32),
        }
        placed = parallel.global_batch(host_batch, mesh)
        started = time.perf_counter()
        compiled = step.jitted.lower(state, placed).compile()
        compile_seconds = time.perf_counter() - started
        cost = compiled.cost_analysis() or {}
        cost = cost[0] if isinstance(cost, list) else cost
        state, _ = compiled(state, placed)  # warm
        jax.block_until_ready(state)
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            state, _ = compiled(state, placed)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - started)
    finally:
        onednn.set_backend(previous)
    peaks = cpu_peaks(mesh)
    flops, accessed = float(cost.get("flops", 0.0)) * mesh.size, float(cost.get("bytes accessed", 0.0)) * mesh.size
    roofline = max(flops / peaks["flops"], accessed / peaks["bytes"])
    measured = float(np.median(times))
    return {
        "utilisation": roofline / measured,
        "measured_seconds": measured,
        "roofline_seconds": roofline,
        "flops": flops,
        "bytes": accessed,
        "cpu_flops_per_s": peaks["flops"],
        "cpu_bytes_per_s": peaks["bytes"],
        "devices": mesh.size,
        "batch": batch,
        "compile_seconds": compile_seconds,
        "model": config.model.name,
    }


# ---------------------------------------------------------------- the command


def make_plan(
    config,
    topology: str,
    *,
    sizes: dict,
    deepfool_iterations: float,
    utilisation: float | str,
    bisect: str,
    costs: bool = True,
    only: tuple[str, ...] = (),
    effort: float = 0.0,
    report: Callable[[str], None] = print,
    partial: Callable[[dict], None] | None = None,
) -> dict:
    """The plan of `config` on `topology` (see the module docstring) as a JSON-able dict; without `costs` the cost
    probes are not compiled (FLOPs, bytes and hours are then 0). `only`: keep the programs whose name contains one of
    these words (case-insensitive; the hours then cover those programs only, and the plan says so). `effort`: the
    compiler's optimisation effort (see `compile_program`; other than 0 the figures are not the run's).

    `partial`, if given, receives the plan so far after each program (its `complete` is False and `remaining` names
    the programs not yet compiled), so that a long plan that stops late keeps what it found."""
    if not -1.0 <= effort <= 1.0:
        raise PlanError(f"the compile effort must lie in [-1, 1], got {effort}")
    mesh, chip, hosts = topology_mesh(topology)
    problems = validate.config_problems(config, available_devices=mesh.size, process_count=hosts, platform="tpu")
    if problems:
        raise PlanError(
            f"the config does not run on {topology} ({mesh.size} chips, {hosts} hosts): " + "; ".join(problems)
        )
    calibration = None
    if utilisation == "auto":
        report("calibrating the utilisation on this CPU (the configured train step at a small batch) ...")
        calibration = calibrate_utilisation(config)
        utilisation = calibration["utilisation"]
    reports = []

    # The plan of the programs compiled so far (`reports` grows in place), given those still `remaining`.
    fixed = (config, topology, mesh, chip, hosts, sizes, deepfool_iterations, utilisation, calibration, only, effort)
    assemble = functools.partial(_assemble_plan, *fixed, reports)

    with backends.building_for("tpu"):
        programs = run_programs(config, mesh, sizes, deepfool_iterations)
        if only:
            kept = [p for p in programs if any(word.lower() in p.name.lower() for word in only)]
            if not kept:
                raise PlanError(
                    f"--programs {','.join(only)} matches none of this run's programs: {[p.name for p in programs]}"
                )
            programs = kept
        for done, program in enumerate(programs):
            report(f"compiling {program.name} for {topology} (global batch {program.batch}) ...")
            reports.append(
                report_program(
                    program,
                    mesh,
                    chip,
                    bisect == "all" or (bisect == "train" and program.name == "train step"),
                    costs,
                    effort,
                )
            )
            if partial is not None and done + 1 < len(programs):
                partial(assemble(remaining=[p.name for p in programs[done + 1 :]]))
    return assemble()


def _assemble_plan(
    config,
    topology,
    mesh,
    chip,
    hosts,
    sizes,
    deepfool_iterations,
    utilisation,
    calibration,
    only,
    effort,
    reports,
    remaining=(),
) -> dict:
    """The plan's JSON-able dict from the program reports compiled so far (see `make_plan`); complete unless
    programs `remaining` are still to compile."""
    phases: dict[str, dict] = {}
    for r in reports:
        for phase, hours in r.hours_roofline.items():
            entry = phases.setdefault(phase, {"hours_roofline": 0.0})
            entry["hours_roofline"] += hours
    for entry in phases.values():
        entry["hours_at_utilisation"] = entry["hours_roofline"] / utilisation
        entry["chip_hours_at_utilisation"] = entry["hours_at_utilisation"] * mesh.size
    return {
        "complete": not remaining,
        "remaining": list(remaining),
        "topology": topology,
        "chips": mesh.size,
        "hosts": hosts,
        "chip": dataclasses.asdict(chip),
        "sizes": sizes,
        "deepfool_iterations": deepfool_iterations,
        "utilisation": utilisation,
        "calibration": calibration,
        "only": list(only),
        "compile_effort": effort,
        "config": {
            "model": config.model.name,
            "loss": config.train.loss,
            "batch": config.train.batch_size,
            "epochs": config.train.epochs,
            "compute_dtype": str(np.dtype(backends.COMPUTE_DTYPES.get(config.train.compute_dtype, jnp.bfloat16)))
            if config.train.compute_dtype != "auto"
            else "bfloat16 (auto)",
            "strategy": config.pruning.strategy,
            "score": config.scoring.score,
        },
        "programs": [dataclasses.asdict(r) for r in reports],
        "phases": phases,
        "total": {
            "hours_roofline": sum(p["hours_roofline"] for p in phases.values()),
            "hours_at_utilisation": sum(p["hours_at_utilisation"] for p in phases.values()),
            "chip_hours_at_utilisation": sum(p["chip_hours_at_utilisation"] for p in phases.values()),
        },
        "estimate": "compiled by the TPU compiler on a CPU host; times from published peaks (roofline) and "
        + (
            "a utilisation calibrated on this CPU"
            if calibration
            else f"a utilisation of {utilisation:g} given on the command line"
        )
        + "; not measured on a TPU"
        + (
            ""
            if not effort
            else f"; compiled at optimisation effort {effort:g}, not the run's: memory and costs are not the run's"
        ),
    }


def restate(plan: dict, utilisation: float, reason: str) -> dict:
    """`plan` with its hours re-stated at another `utilisation` (0 < u <= 1), without compiling anything: the
    roofline hours are the compiler's and stay; the hours at the utilisation are roofline / u. The replaced
    calibration is kept under 'replaced_calibration' with `reason`."""
    if not 0.0 < utilisation <= 1.0:
        raise PlanError(f"the utilisation must lie in (0, 1], got {utilisation}")
    out = copy.deepcopy(plan)
    out["replaced_calibration"] = {
        "utilisation": plan["utilisation"],
        "calibration": plan["calibration"],
        "why": reason,
    }
    out["utilisation"], out["calibration"] = utilisation, None
    for entry in out["phases"].values():
        entry["hours_at_utilisation"] = entry["hours_roofline"] / utilisation
        entry["chip_hours_at_utilisation"] = entry["hours_at_utilisation"] * out["chips"]
    for key in ("hours_at_utilisation", "chip_hours_at_utilisation"):
        out["total"][key] = sum(p[key] for p in out["phases"].values())
    out["estimate"] = (
        "compiled by the TPU compiler on a CPU host; times from published peaks (roofline) and a utilisation of "
        f"{utilisation:g} re-stated after the plan ({reason}); not measured on a TPU"
    )
    return out


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def program_table(plan: dict) -> list[str]:
    """The plan's programs as a Markdown table, one row each (README and docs tables come from here too)."""
    lines = [
        "| program | global batch (per chip) | compiled | compile s | HBM per chip | largest per-chip batch that fits | GFLOP / image | MB / image "
        "| collectives per call | roofline ms per call | bound | CUDA lowering |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in plan["programs"]:
        collectives = (
            ", ".join(
                f"{k} {v[0]:.0f} ({v[1] / 2**20:.1f} MiB)" for k, v in sorted(p["collectives_per_call"].items()) if v[0]
            )
            or "none"
        )
        compiled = "yes" if p["compiled"] else f"no: {p['error'][:160]}"
        largest = "" if p["max_per_chip_batch"] is None else str(p["max_per_chip_batch"])
        lines.append(
            f"| {p['name']} | {p['global_batch']} ({p['per_chip_batch']}) | {compiled} | {p['compile_seconds']:.0f} "
            f"| {_gib(p['hbm_bytes'])} of {_gib(p['hbm_capacity'])}{'' if p['fits'] else ' (does not fit)'} | {largest} "
            f"| {p['flops_per_image'] / 1e9:.2f} | {p['bytes_per_image'] / 1e6:.2f} | {collectives} | {p['roofline_seconds_per_call'] * 1e3:.2f} "
            f"| {p['bound']} | {p['gpu_lowering'][:120]} |"
        )
    return lines


def phase_table(plan: dict) -> list[str]:
    """The plan's hours per phase, at roofline and at its utilisation, as a Markdown table."""
    u = plan["utilisation"]
    lines = [
        f"| phase | hours at roofline | hours at utilisation {u:.2f} | chip-hours at utilisation {u:.2f} |",
        "| --- | --- | --- | --- |",
    ]
    for phase, entry in plan["phases"].items():
        lines.append(
            f"| {phase} | {entry['hours_roofline']:.2f} | {entry['hours_at_utilisation']:.1f} | {entry['chip_hours_at_utilisation']:.0f} |"
        )
    total = plan["total"]
    lines.append(
        f"| total | {total['hours_roofline']:.2f} | {total['hours_at_utilisation']:.1f} | {total['chip_hours_at_utilisation']:.0f} |"
    )
    if not plan.get("complete", True):
        lines.append(f"| not in the total (the plan stopped before them): {', '.join(plan['remaining'])} | | | |")
    return lines


def format_plan(plan: dict) -> str:
    """The plan as Markdown: the chip, one row per program, the hours per phase, then notes."""
    chip = plan["chip"]
    u = plan["utilisation"]
    lines = (
        [
            f"## {plan['config']['model']} {plan['config']['loss']} on {plan['topology']}: {plan['chips']} x {chip['name']} "
            f"({plan['hosts']} hosts), {_gib(chip['hbm_bytes'])} HBM, {chip['bf16_flops'] / 1e12:.0f} TFLOP/s bf16, "
            f"{chip['hbm_bandwidth'] / 1e9:.0f} GB/s ({chip['source']})",
            "",
        ]
        + program_table(plan)
        + [""]
        + phase_table(plan)
    )
    notes = [f"- {p['name']}: {p['notes']}" for p in plan["programs"] if p["notes"]]
    bad = [
        f"- {p['name']}: {k} {v}"
        for p in plan["programs"]
        for k, v in p["hygiene"].items()
        if k != "custom_call_targets" and v
    ]
    if plan["calibration"]:
        c = plan["calibration"]
        notes.append(
            f"- utilisation {u:.3f} calibrated on this CPU: the train step ({c['model']}, batch {c['batch']} on {c['devices']} devices, "
            f"XLA convolutions) took {c['measured_seconds']:.2f} s against a roofline of {c['roofline_seconds']:.3f} s here "
            f"({c['cpu_flops_per_s'] / 1e9:.0f} GFLOP/s, {c['cpu_bytes_per_s'] / 1e9:.1f} GB/s measured)"
        )
    if plan.get("only"):
        notes.append(f"- only the programs matching {', '.join(plan['only'])}: the hours leave the others out")
    notes.append(f"- {plan['estimate']}")
    return "\n".join(lines + [""] + notes + (["", "Not for an accelerator (must be empty):"] + bad if bad else []))


def write_plan(plan: dict, path: str) -> None:
    """Writes `plan` as JSON to `path` atomically (a temporary file, then a rename): a reader, or a plan killed while
    writing, never leaves half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(plan, f, indent=1)
    os.replace(tmp, path)


def _report(line: str) -> None:
    print(line, flush=True)


def main(argv=None) -> int:
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "configs/<x>.py[:variant]", flag_values=flag_values, lock_config=True
    )
    flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:2x4, v5p:2x2x1, v5e:8x8", flag_values=flag_values)
    flags.DEFINE_integer(
        "synthetic_size",
        None,
        "generated images in the pool (default: the config's generated data, else 1,000,000)",
        flag_values=flag_values,
    )
    flags.DEFINE_integer("original_size", 50_000, "images of the original training split", flag_values=flag_values)
    flags.DEFINE_integer("test_size", 10_000, "images of the test split", flag_values=flag_values)
    flags.DEFINE_float(
        "deepfool_iterations",
        5.0,
        "mean DeepFool iterations per sample (an assumption; the score phase logs the measured mean)",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "utilisation", "auto", "'auto' (calibrated on this CPU) or a fraction of the roofline", flag_values=flag_values
    )
    flags.DEFINE_enum(
        "bisect",
        "train",
        ["train", "all", "none"],
        "which programs get the largest per-chip batch that fits",
        flag_values=flag_values,
    )
    flags.DEFINE_string("out", "plan.json", "where to write the plan", flag_values=flag_values)
    flags.DEFINE_list(
        "programs",
        [],
        "only the programs whose name contains one of these words, e.g. 'train step,DeepFool' "
        "(default: every program of the run)",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "restate",
        None,
        "a plan.json to re-state at --utilisation (a number) without compiling; --restate_reason says why",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "restate_reason", "", "why the utilisation is re-stated (kept in the plan)", flag_values=flag_values
    )
    flags.DEFINE_float(
        "compile_effort",
        0.0,
        "the TPU compiler's optimisation effort, -1 to 1 (0: what the run gets; -1 compiles "
        "about twice as fast, to check that every program compiles, but its memory and cost figures are not the run's)",
        flag_values=flag_values,
    )
    try:
        flag_values(argv or sys.argv)
    except flags.Error as error:  # a typo in a flag: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not os.environ.get("JAX_PLATFORMS"):  # this host computes on its CPU (calibration); TPUs are only compiled for
        jax.config.update("jax_platforms", "cpu")
    if flag_values.restate:
        if flag_values.utilisation == "auto":
            print("error: --restate needs --utilisation as a number, e.g. 0.5", file=sys.stderr)
            return 2
        try:
            with open(flag_values.restate) as f:
                restated = restate(json.load(f), float(flag_values.utilisation), flag_values.restate_reason or "given")
        except (OSError, ValueError, KeyError, PlanError) as error:
            print(f"error: --restate {flag_values.restate}: {error}", file=sys.stderr)
            return 2
        print(format_plan(restated))
        write_plan(restated, flag_values.out)
        print(f"\nwrote {flag_values.out}")
        return 0
    if flag_values.config is None or not flag_values.topology:
        print("error: --config and --topology are required", file=sys.stderr)
        return 2
    config = flag_values.config
    generated = getattr(config.data, "generated_sizes", None) if config.data.name == "generated" else None
    sizes = {
        "original": int(generated[0]) if generated else flag_values.original_size,
        "synthetic": flag_values.synthetic_size or (int(generated[2]) if generated else 1_000_000),
        "test": int(generated[1]) if generated else flag_values.test_size,
    }
    utilisation: float | str = (
        flag_values.utilisation if flag_values.utilisation == "auto" else float(flag_values.utilisation)
    )
    try:
        plan = make_plan(
            config,
            flag_values.topology,
            sizes=sizes,
            deepfool_iterations=flag_values.deepfool_iterations,
            utilisation=utilisation,
            bisect=flag_values.bisect,
            only=tuple(flag_values.programs),
            effort=flag_values.compile_effort,
            report=_report,
            partial=lambda so_far: write_plan(so_far, flag_values.out),
        )
    except PlanError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    write_plan(plan, flag_values.out)
    print(f"\nwrote {flag_values.out}")
    train = next((p for p in plan["programs"] if p["name"] == "train step"), None)
    if train is not None and not train["fits"]:
        largest = train["max_per_chip_batch"]
        why = train["error"] or f"{_gib(train['hbm_bytes'])} per chip, {_gib(train['hbm_capacity'])} available"
        print(
            f"\nrefused: the train step at batch {train['global_batch']} ({train['per_chip_batch']} per chip) does not fit "
            f"{plan['topology']}: {why}. Largest per-chip batch that fits: {largest} (global {None if largest is None else largest * plan['chips']})",
            file=sys.stderr,
        )
        return EXIT_DOES_NOT_FIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
