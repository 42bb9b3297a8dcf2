"""`plan`: every config's programs compile for real TPU topologies on this CPU (libtpu), memory follows the batch,
an oversized batch is refused, and the train step `plan` compiles is the one the run executes."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO
from ml_collections import config_flags  # noqa: F401  (the configs' loader)

from jax_advprune import backends, parallel, plan, training
from jax_advprune.phases.common import build_model

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[plan]'); plan compiles for TPU topologies with it",
)

CONFIGS = ["default.py:smoke", "cifar10_trades.py:smoke", "cifar10_puma.py:smoke", "cifar10_extrapolation.py:smoke"]


def load_config(name: str, small_model: bool = True):
    """configs/<name> ('file.py:variant'); with `small_model` its model is a small CNN (8/16/32 channels): the TPU
    compiler takes about 80 s per program for the smoke variants' WRN-10-1 on 2 cores, a few seconds for this."""
    path, _, variant = name.partition(":")
    config = importlib.import_module("configs." + path.removesuffix(".py")).get_config(variant or None)
    if small_model:
        config.model.name = "small_cnn"
        config.model.kwargs = {"widths": (8, 16, 32)}
    return config


@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize("topology", ["v5e:2x2", "v5e:2x4"])
def test_every_smoke_config_compiles_for_a_topology_with_nothing_cpu_only_in_it(topology):
    """4 chips on one host and 8 chips on 2 hosts, every config's smoke variant with a small CNN: every program
    compiles, fits, holds no CPU custom call, host callback or float64 value, and lowers for CUDA GPUs. At the
    compiler's lowest effort (-1), which halves its time, and with the programs the configs share compiled once: both
    topologies took 117 s on 2 idle cores (one topology took 152 s at the default effort without sharing). The memory
    figures at effort -1 are not the run's; the test below checks them at the default effort."""
    for name in CONFIGS:
        partials = []
        result = plan.make_plan(
            load_config(name),
            topology,
            sizes={"original": 512, "synthetic": 1024, "test": 128},
            deepfool_iterations=2,
            utilisation=0.3,
            bisect="none",
            costs=False,
            effort=-1.0,
            report=lambda line: None,
            partial=partials.append,
        )
        assert result["compile_effort"] == -1.0 and "not the run's" in result["estimate"]
        # After each program but the last, the plan so far: a plan that stops late keeps what it compiled.
        assert result["complete"] and not result["remaining"]
        assert len(partials) == len(result["programs"]) - 1
        for done, so_far in enumerate(partials, start=1):
            assert not so_far["complete"] and so_far["programs"] == result["programs"][:done]
            assert so_far["remaining"] == [p["name"] for p in result["programs"][done:]]
            assert "not in the total" in plan.phase_table(so_far)[-1]
        assert result["chips"] == (4 if topology == "v5e:2x2" else 8) and result["hosts"] == (
            1 if topology == "v5e:2x2" else 2
        )
        names = [p["name"] for p in result["programs"]]
        assert "train step" in names and any(n.startswith("evaluation PGD") for n in names), names
        for program in result["programs"]:
            assert program["compiled"], (name, program["name"], program["error"])
            assert program["fits"], (name, program["name"])
            hygiene = program["hygiene"]
            assert not hygiene["cpu_custom_calls"] and not hygiene["host_callbacks"] and not hygiene["f64"], (
                name,
                program["name"],
                hygiene,
            )
            assert program["gpu_lowering"] == "ok", (name, program["name"], program["gpu_lowering"])
        if name.startswith("cifar10_puma"):
            assert any(n.startswith("DeepFool") for n in names)
        if name.startswith("cifar10_extrapolation"):
            assert any(n.startswith("kNN") for n in names)


@pytest.mark.slow
@needs_libtpu
def test_costs_come_from_probes_and_memory_grows_with_the_batch():
    config = load_config("cifar10_trades.py:smoke")
    mesh, chip, _ = plan.topology_mesh("v5e:2x2")
    with backends.building_for("tpu"):
        program = next(
            p
            for p in plan.run_programs(config, mesh, {"original": 512, "synthetic": 1024, "test": 128}, 2)
            if p.name == "train step"
        )
        # Far apart: between 32 and 256 images per chip the compiler's temporaries stay flat (4.97 MB for this step,
        # with the reference optimiser's options on), and below that they need not shrink (4 per chip: 5.45 MB).
        small, large = (plan.compile_program(*program.build(per_chip * mesh.size)) for per_chip in (4, 1024))
        flops, _, collectives = plan._probe_costs(program, program.batch)
        one = plan.compile_program(*program.build(program.batch, loop=1))
    assert small.ok and large.ok
    assert large.hbm_bytes > small.hbm_bytes and large.temp_bytes > small.temp_bytes
    # The attack loop counted config.attack.steps times: more than the one-iteration probe, and the loop-form program
    # (which XLA's analysis counts once) is below the probe-based figure.
    assert config.attack.steps == 2 and flops > one.flops
    assert collectives.get("all-reduce", [0])[0] > 0  # BatchNorm statistics and gradients are summed over chips


@pytest.mark.slow
@needs_libtpu
def test_every_looped_program_s_cost_probes_compile():
    """The one- and two-iteration probes of every program with a loop (train step, PGD, APGD-CE, APGD-T, FAB-T) of
    the standard-AutoAttack config compile for a TPU: a full-size plan of configs/cifar10_trades.py once stopped after
    80 minutes of compiles at APGD-T's probes, whose function took no `unroll`."""
    config = load_config("cifar10_trades.py:smoke")
    mesh, _, _ = plan.topology_mesh("v5e:2x2")
    with backends.building_for("tpu"):
        looped = [
            p
            for p in plan.run_programs(config, mesh, {"original": 512, "synthetic": 1024, "test": 128}, 2)
            if p.loop_count > 0
        ]
        names = {p.name for p in looped}
        assert {"AutoAttack apgd-ce", "AutoAttack apgd-t", "AutoAttack fab-t", "train step"} <= names, names
        for program in looped:
            for n in (1, 2):
                compiled = plan.compile_program(*program.build(program.batch, loop=n), -1.0)
                assert compiled.ok, (program.name, n, compiled.error)


@pytest.mark.slow
@needs_libtpu
def test_an_oversized_batch_is_refused_with_the_largest_that_fits(tmp_path):
    """The README's command with a batch no v5e chip holds: exit status 3, the compiler's reason, and a batch that fits.
    At the compiler's lowest effort (--compile_effort -1: the search's compiles take half the time; its memory
    figures are not the run's, and the refusal and the search are the same code)."""
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jax_advprune.plan",
            "--config",
            os.path.join(REPO, "configs/default.py:smoke"),
            "--topology",
            "v5e:2x2",
            "--config.train.batch_size=4194304",
            "--programs",
            "train step",
            "--utilisation",
            "0.3",
            "--bisect",
            "none",
            "--compile_effort",
            "-1",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == plan.EXIT_DOES_NOT_FIT, proc.stdout + proc.stderr
    assert "does not fit" in proc.stderr and "Largest per-chip batch that fits" in proc.stderr, proc.stderr
    largest = int(re.search(r"Largest per-chip batch that fits: (\d+)", proc.stderr).group(1))
    assert 1 <= largest < 4194304 // 4
    train = next(p for p in json.loads(out.read_text())["programs"] if p["name"] == "train step")
    assert not train["fits"] and train["max_per_chip_batch"] == largest


PLACEMENT_ONLY = {"reshard", "sharding_constraint", "device_put", "mesh_cast"}


def _operations(jaxpr) -> list:
    """Every equation of `jaxpr` and its sub-jaxprs, in order, as (primitive, output shapes and dtypes), leaving out
    the ones that only place values on devices (which differ between meshes of different devices): what is computed."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in PLACEMENT_ONLY:
            continue
        found.append(
            (
                eqn.primitive.name,
                tuple((tuple(v.aval.shape), str(v.aval.dtype)) for v in eqn.outvars if hasattr(v.aval, "shape")),
            )
        )
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found.extend(_operations(inner))
    return found


def _step_operations(step, state, batch) -> list:
    return _operations(jax.make_jaxpr(step.jitted)(state, batch).jaxpr)


@pytest.mark.slow
@needs_libtpu
def test_the_train_step_plan_compiles_is_the_run_s_on_the_cpu_mesh():
    """plan's train step on the TPU mesh and the run's on this machine's CPU devices, both built for a TPU (the form the
    run takes there), trace to the same operations at the same global batch (device placements aside)."""
    config = load_config("cifar10_trades.py:smoke")
    tpu_mesh, _, _ = plan.topology_mesh("v5e:2x2")
    cpu_mesh = parallel.make_mesh(4)
    texts = []
    with backends.building_for("tpu"):
        tpu_program = next(
            p
            for p in plan.run_programs(config, tpu_mesh, {"original": 512, "synthetic": 1024, "test": 128}, 2)
            if p.name == "train step"
        )
        unrolled, (state, batch) = tpu_program.build(64)
        texts.append(_step_operations(_Step(unrolled.jitted), state, batch))
        model = build_model(config, config.train.compute_dtype)
        tx = training.make_optimizer(config.train, 1000)
        run_step = training.make_train_step(
            model, tx, config.train, config.attack, cpu_mesh, ema_from=training.ema_start(config.train, 1000)
        )
        cpu_state = jax.eval_shape(lambda: training.init_train_state(model, tx, (32, 32, 3), config.seed))
        cpu_batch = {
            "image": jax.ShapeDtypeStruct((64, 32, 32, 3), np.uint8),
            "label": jax.ShapeDtypeStruct((64,), np.int32),
            "eps": jax.ShapeDtypeStruct((64,), np.float32),
        }
        texts.append(_step_operations(run_step, cpu_state, cpu_batch))
    assert len(texts[0]) > 100 and texts[0] == texts[1]
    names = {name for name, _ in texts[0]}
    assert (
        names & {"scan", "while"}
        and "conv_general_dilated" in names
        and not names & {"ffi_call", "custom_partitioning"}
    ), names
    # the accelerator form: a loop body, XLA's convolutions (no oneDNN custom call)


class _Step:
    def __init__(self, jitted):
        self.jitted = jitted


def test_the_largest_fitting_batch_search_on_a_known_memory_line(monkeypatch):
    """The search finds the largest per-chip batch within 6% on a program whose memory is 100 MB + 3 MB per image
    (16 GB chip: 5,300 images fit; the search stops at MAX_PER_CHIP_BATCH), on 30 MB per image, also when the
    configured batch (a million per chip) is known not to fit (the refusal's path: the line, not a bisection from
    a million), and on one that fits nothing."""
    chip = plan.Chip("test chip", 1e12, 16e9, 1e11, "none")
    cases = (
        (100e6, 3e6, None, plan.MAX_PER_CHIP_BATCH),
        (100e6, 30e6, None, int((16e9 - 100e6) / 30e6)),
        (100e6, 30e6, 2**20, int((16e9 - 100e6) / 30e6)),
        (17e9, 1e6, None, None),
    )
    for fixed, per_image, failed, expected in cases:
        compiles = []

        def fake(jitted, args, effort=0.0, fixed=fixed, per_image=per_image):
            compiles.append(args[0] // 4)
            if fixed + per_image * args[0] / 4 > 2 * chip.hbm_bytes:  # the TPU compiler refuses what is far too big
                return plan.Compiled(False, 0.0, error="RESOURCE_EXHAUSTED: Ran out of memory on HBM")
            return plan.Compiled(True, 0.0, argument_bytes=int(fixed + per_image * args[0] / 4))

        monkeypatch.setattr(plan, "compile_program", fake)
        program = plan.Program("fake", "train", 64, lambda batch, loop=None: (None, (batch,)), {"train": 1})
        known = {} if failed is None else {failed: fake(None, (failed * 4,))}
        compiles.clear()
        found = plan.largest_fitting_batch(program, 4, chip, known)
        if expected is None:
            assert found is None
        else:
            assert found <= expected and found >= expected / 1.07, (found, expected)
            assert len(compiles) <= (5 if failed else 12), compiles


def test_collectives_and_what_an_accelerator_must_not_run_are_read_from_hlo_text():
    """The HLO readers on hand-written HLO: counts and result bytes per collective kind (async starts included), and
    the oneDNN custom call, a host callback and float64 values flagged."""
    hlo = """
  %all-reduce.1 = f32[64,10]{1,0} all-reduce(f32[64,10]{1,0} %x), replica_groups={}, to_apply=%add
  %ag.2 = (bf16[8,3]{1,0}, f32[2]{0}) all-gather-start(bf16[2,3]{1,0} %y, f32[2]{0} %z), dimensions={0}
  ROOT %all-reduce.3 = bf16[4]{0} all-reduce(bf16[4]{0} %w), to_apply=%add
  %cc = f32[4]{0} custom-call(f32[4]{0} %y), custom_call_target="jax_advprune_onednn_conv"
  %cb = f32[] custom-call(), custom_call_target="xla_python_cpu_callback"
  %c = f64[2]{0} convert(f32[2]{0} %z)
"""
    assert plan.collectives_of(hlo) == {"all-reduce": [2, 64 * 10 * 4 + 4 * 2], "all-gather": [1, 8 * 3 * 2 + 2 * 4]}
    hygiene = plan.hygiene_of(hlo)
    assert hygiene["cpu_custom_calls"] == ["jax_advprune_onednn_conv"] and hygiene["host_callbacks"] == [
        "xla_python_cpu_callback"
    ]
    assert hygiene["f64"]
    clean = plan.hygiene_of("%a = bf16[2]{0} add(bf16[2]{0} %x, bf16[2]{0} %x)")
    assert not clean["cpu_custom_calls"] and not clean["host_callbacks"] and not clean["f64"]


def test_a_written_plan_is_restated_at_another_utilisation_without_compiling(tmp_path):
    """--restate: the roofline hours stay, the hours at the utilisation are roofline / u (chip-hours x the chips), the
    replaced calibration is kept with its reason; a utilisation outside (0, 1] or 'auto' is refused."""
    written = {
        "chips": 8,
        "utilisation": 0.77,
        "calibration": {"utilisation": 0.77, "measured_seconds": 3.4},
        "phases": {"train": {"hours_roofline": 1.3}, "evaluate": {"hours_roofline": 0.7}},
        "total": {"hours_roofline": 2.0},
        "estimate": "",
        "programs": [],
        "chip": {"name": "TPU v5e", "hbm_bytes": 16e9, "bf16_flops": 197e12, "hbm_bandwidth": 819e9, "source": "x"},
        "config": {"model": "m", "loss": "trades"},
        "topology": "v5e:2x4",
        "hosts": 2,
    }
    restated = plan.restate(written, 0.5, "calibrated beside other jobs")
    assert restated["utilisation"] == 0.5 and restated["calibration"] is None
    assert restated["phases"]["train"] == {
        "hours_roofline": 1.3,
        "hours_at_utilisation": 2.6,
        "chip_hours_at_utilisation": 20.8,
    }
    assert restated["total"]["hours_at_utilisation"] == pytest.approx(4.0)
    assert restated["total"]["chip_hours_at_utilisation"] == pytest.approx(32.0)
    assert restated["replaced_calibration"]["why"] == "calibrated beside other jobs"
    assert restated["replaced_calibration"]["calibration"]["measured_seconds"] == 3.4
    assert "re-stated" in restated["estimate"] and written["utilisation"] == 0.77  # the input is not modified
    with pytest.raises(plan.PlanError, match="must lie in"):
        plan.restate(written, 1.5, "")
    source = tmp_path / "plan.json"
    source.write_text(json.dumps(written))
    refused = subprocess.run(
        [sys.executable, "-m", "jax_advprune.plan", "--restate", str(source), "--out", str(tmp_path / "out.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "needs --utilisation as a number" in refused.stderr
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "jax_advprune.plan",
            "--restate",
            str(source),
            "--utilisation",
            "0.5",
            "--out",
            str(tmp_path / "out.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out.json").read_text())["total"]["chip_hours_at_utilisation"] == pytest.approx(32.0)
