"""Every bad setting or input is refused before anything is written or computed, all problems at once."""

import os
import subprocess
import time

import numpy as np
import pytest
from conftest import main_command, make_npz

from configs import default
from jax_advprune.main import run
from jax_advprune.validate import ConfigError, check_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(**overrides):
    """configs/default.py:smoke with dotted-key overrides ('train.batch_size': 7)."""
    config = default.get_config("smoke")
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


# (overrides, what the message must name): each refused with its key, its value and what is allowed.
BAD_SETTINGS = [
    ({"eval.apgd_targets": 10}, "eval.apgd_targets=10: a number in [1, 9]"),
    ({"eval.attack": "autoatack"}, "eval.attack='autoatack': one of pgd, autoattack_lite, autoattack"),
    ({"eval.square_queries": 0}, "eval.square_queries=0"),
    ({"eval.apgd_targets": -1}, "eval.apgd_targets=-1"),
    ({"eval.generated_test_size": -5}, "eval.generated_test_size=-5: a number in [0, inf]"),
    ({"eval.weights": ("ema", "best")}, "eval.weights=('ema', 'best'): a non-empty subset of best_ema, ema, raw"),
    (
        {"eval.weights": ("best_ema",), "train.validation_size": 0},
        "eval.weights=('best_ema',): more than 'best_ema' with train.validation_size=0",
    ),
    (
        {"eval.generated_test_size": 100, "data.name": "npz"},
        "eval.generated_test_size=100: 0 with data.name='npz' (a held-out generated split is drawn from",
    ),
    ({"attack.eps": -1.0}, "attack.eps=-1.0"),
    ({"attack.eps": 2.0}, "attack.eps=2.0: a number in (0, 1]"),
    ({"attack.norm": "l3"}, "attack.norm='l3': one of linf, l2"),
    ({"attack.steps": 0}, "attack.steps=0"),
    ({"pruning.strategy": "pumaa"}, "pruning.strategy='pumaa' is not a strategy; allowed: random, prune_easy"),
    ({"pruning.keep_ratio": 1.5}, "pruning.keep_ratio=1.5 must be in (0, 1]"),
    ({"pruning.keep_ratio": 0.0}, "pruning.keep_ratio=0.0 must be in (0, 1]"),
    ({"pruning.scope": "original"}, "pruning.scope='original': one of all, synthetic"),
    ({"pruning.puma.eps_min": 0.5}, "pruning.puma.eps_min=0.5 must be in [0, attack.eps=0.05]"),
    ({"pruning.puma.rule": "below"}, "pruning.puma.rule='below'"),
    ({"pruning.puma.misclassified": "zero"}, "pruning.puma.misclassified='zero'; allowed: eps_min, eps_zero, drop"),
    ({"scoring.history_protocol": "nieth"}, "scoring.history_protocol='nieth': one of mixed, reference"),
    (
        {
            "scoring.score": "du",
            "pruning.strategy": "keep_top",
            "scoring.history_early_stop": 3,
            "train.validation_size": 0,
        },
        "scoring.history_early_stop=3: 0 with train.validation_size=0",
    ),
    (
        {"scoring.extrapolation.enabled": True, "scoring.extrapolation.embedding_model": "resnet"},
        "scoring.extrapolation.embedding_model='resnet': one of preact_resnet18",
    ),
    (
        {"scoring.extrapolation.enabled": True, "scoring.extrapolation.embedding_model": "small_cnn"},
        "scoring.extrapolation.embedding_model='small_cnn': '' without scoring.extrapolation.embedding_from",
    ),
    (
        {"scoring.extrapolation.enabled": True, "scoring.extrapolation.embedding_from": "/nonexistent/sscd.pt"},
        "scoring.extrapolation.embedding_from='/nonexistent/sscd.pt': no such file or directory",
    ),
    ({"scoring.deepfool.norm": "l2"}, "scoring.deepfool.norm ('l2') must equal attack.norm ('linf')"),
    ({"scoring.score": "el2n"}, "pruning.strategy='puma' ranks DeepFool margins, but scoring.score='el2n'"),
    ({"scoring.score": "el2"}, "scoring.score='el2': one of margin, el2n"),
    (
        {"scoring.deepfool.candidates": 10},
        "scoring.deepfool.candidates=10: 0 (all classes) or a number of candidate classes in [1, 9]",
    ),
    ({"scoring.slots": 6, "num_devices": 4}, "scoring.slots=6: a multiple of the 4 devices"),
    ({"train.batch_size": 7, "num_devices": 4}, "train.batch_size=7: a multiple of the 4 devices of the mesh"),
    ({"num_devices": 3}, "train.batch_size=64: a multiple of the 3 devices of the mesh"),
    ({"train.epochs": 0.0}, "train.epochs=0.0"),
    ({"train.lr": float("nan")}, "train.lr=nan"),
    ({"train.loss": "mart"}, "train.loss='mart': one of pgd_at, trades"),
    ({"train.compute_dtype": "float16"}, "train.compute_dtype='float16': one of bfloat16, float32"),
    ({"train.original_fraction": 1.0}, "train.original_fraction=1.0"),
    ({"train.validation_size": 5000}, "train.validation_size=5000: a number in [0, 1528)"),
    ({"eval.batch_size": 6, "num_devices": 4}, "eval.batch_size=6: a multiple of the 4 devices"),
    ({"num_devices": 64}, "num_devices=64: a number in [0, 4]"),
    ({"model.name": "resnet50"}, "model.name='resnet50': one of preact_resnet18, small_cnn"),
    ({"model.name": "preact_resnet18"}, "widths not accepted by model 'preact_resnet18', whose settings are"),
    ({"model.kwargs.mean": (0.5, 0.5, 0.5)}, "model.kwargs.mean=(0.5, 0.5, 0.5): 1 value, one per image channel (1)"),
    ({"data.name": "cifar"}, "data.name='cifar': one of digits, npz"),
    (
        {"scoring.score": "du", "pruning.strategy": "keep_top", "scoring.du_window": 20},
        "scoring.du_window=20: at most the 2 epochs",
    ),
    (
        {"scoring.extrapolation.enabled": True, "scoring.extrapolation.subset_size": 10**6},
        "scoring.extrapolation.subset_size=1000000: a number in [1, 2000]",
    ),
    (
        {"scoring.extrapolation.enabled": True, "scoring.score": "random", "pruning.strategy": "keep_top"},
        "scoring.extrapolation.enabled=True: False with scoring.score='random'",
    ),
]


@pytest.mark.parametrize("overrides,message", BAD_SETTINGS, ids=[",".join(o) for o, _ in BAD_SETTINGS])
def test_a_bad_setting_is_refused_with_key_value_and_what_is_allowed(tmp_path, overrides, message):
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError) as error:
        run(smoke_config(**overrides), str(workdir))
    assert message in str(error.value) and "nothing was computed or written" in str(error.value)
    assert not workdir.exists()


def test_every_problem_is_reported_at_once_and_quickly():
    config = smoke_config(
        **{
            "attack.eps": -1.0,
            "pruning.strategy": "pumaa",
            "train.batch_size": 7,
            "eval.apgd_targets": 20,
            "num_devices": 4,
        }
    )
    start = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        check_run(config, "/nonexistent/workdir", available_devices=4)
    assert time.perf_counter() - start < 10
    assert len(error.value.problems) == 4, error.value.problems


def test_the_configs_of_the_repository_pass(tmp_path):
    from configs import cifar10_extrapolation, cifar10_puma, cifar10_trades

    for module in (default, cifar10_trades, cifar10_puma, cifar10_extrapolation):
        check_run(module.get_config("smoke"), str(tmp_path / "none"), available_devices=4)
    check_run(default.get_config(), str(tmp_path / "none"), available_devices=4)
    check_run(
        smoke_config(**{"scoring.deepfool.candidates": 0}), str(tmp_path / "none"), available_devices=4
    )  # all classes


@pytest.mark.parametrize("available", [1, 3, 5, 8, 24, 48])
def test_on_the_cpu_the_mesh_is_the_largest_count_that_divides_every_split_size(tmp_path, available):
    from configs import cifar10_extrapolation, cifar10_puma, cifar10_trades
    from jax_advprune.validate import mesh_size, split_sizes

    for module in (default, cifar10_trades, cifar10_puma, cifar10_extrapolation):
        for variant in ("smoke", None):
            config = module.get_config(variant)
            sizes = split_sizes(config).values()
            chosen = mesh_size(config, available)
            assert 1 <= chosen <= available and all(size % chosen == 0 for size in sizes)
            assert not any(all(size % larger == 0 for size in sizes) for larger in range(chosen + 1, available + 1))
            if variant == "smoke" or module is default:  # the others read CIFAR-10 files that are not here
                check_run(
                    config, str(tmp_path / "none"), available_devices=available
                )  # no device-count problem on the CPU
    smoke = default.get_config("smoke")  # batches of 64 and 256, slots 256, chunks of 4096
    assert mesh_size(smoke, available) == {1: 1, 3: 2, 5: 4, 8: 8, 24: 16, 48: 32}[available]
    # Two processes contribute the same number of devices each: 2 x 16 of 2 x 24.
    assert mesh_size(smoke, 48, process_count=2) == 32 and mesh_size(smoke, 6, process_count=2) == 4
    # GPUs and TPUs: every device, and a batch that does not divide is refused by name.
    assert mesh_size(smoke, available, platform="gpu") == available
    if 64 % available:
        with pytest.raises(ConfigError, match=f"train.batch_size=64: a multiple of the {available} devices"):
            check_run(smoke, str(tmp_path / "none"), available_devices=available, platform="gpu")
    assert mesh_size(smoke_config(num_devices=2), available if available >= 2 else 2) == 2  # set explicitly: as set


def test_data_files_that_are_missing_or_directories_are_named(tmp_path):
    make_npz(tmp_path / "orig.npz", 40)
    os.mkdir(tmp_path / "test_dir.npz")
    config = smoke_config(
        **{"data.name": "npz", "data.original": str(tmp_path / "orig.npz"), "data.test": str(tmp_path / "test_dir.npz")}
    )
    config.data.synthetic = (str(tmp_path / "missing.npz"),)
    with pytest.raises(ConfigError) as error:
        run(config, str(tmp_path / "run"))
    assert f"data file='{tmp_path / 'test_dir.npz'}': a regular file, not a directory" in str(error.value)
    assert f"data file='{tmp_path / 'missing.npz'}': an existing file" in str(error.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "phases,message",
    [
        (("select", "score"), "an ordered subset of score,select,train,evaluate"),
        (("score", "trian"), "an ordered subset"),
        (("train",), "train needs"),
        (("evaluate",), "evaluate needs"),
        (("select",), "select needs"),
    ],
)
def test_phase_subsets_are_ordered_and_have_their_inputs(tmp_path, phases, message):
    with pytest.raises(ConfigError, match=message):
        check_run(smoke_config(), str(tmp_path / "run"), available_devices=4, phases=phases)
    check_run(smoke_config(), str(tmp_path / "run"), available_devices=4, phases=("score", "select"))


def test_init_from_paths_and_pairings_are_checked(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    config = smoke_config(
        **{
            "scoring.init_from": str(tmp_path / "missing.pt"),
            "train.init_from": str(tmp_path / "notes.txt"),
            "eval.init_from": str(tmp_path),
        }
    )
    with pytest.raises(ConfigError) as error:
        check_run(config, str(tmp_path / "run"), available_devices=4)
    text = str(error.value)
    assert "scoring.init_from" in text and "no such file" in text
    assert "train.init_from" in text and "a checkpoint file ending in .pt" in text
    assert "eval.init_from" in text and "a jax_advprune work directory" in text
    import jax

    from jax_advprune.models import create_model
    from jax_advprune.models.torch_export import save_state_dict
    from jax_advprune.models.torch_keys import state_dict_from_variables

    wrn = create_model("wide_resnet", depth=10, width=1)
    save_state_dict(
        state_dict_from_variables(wrn, wrn.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 1), np.float32))),
        str(tmp_path / "wrn.safetensors"),
    )
    with pytest.raises(
        ConfigError,
        match=r"does not fit SmallCNN: missing conv0.weight.*Its top-level keys are batchnorm, init_conv, layer, logits",
    ):
        run(smoke_config(**{"scoring.init_from": str(tmp_path / "wrn.safetensors")}), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # refused before the work directory exists
    (tmp_path / "model.pt").write_bytes(b"")
    history = smoke_config(
        **{"scoring.init_from": str(tmp_path / "model.pt"), "scoring.score": "du", "pruning.strategy": "keep_top"}
    )
    with pytest.raises(ConfigError, match="a history score needs a training run"):
        check_run(history, str(tmp_path / "run"), available_devices=4)


def test_a_work_directory_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="--workdir=.*: a directory \\(this is a file\\)"):
        run(smoke_config(), str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "x"


def test_a_replaced_pool_file_is_refused_naming_it(tmp_path):
    """Settings record a fingerprint of every input; a file replaced at the same path stops the rerun."""
    from jax_advprune import run_dir

    paths = [str(tmp_path / name) for name in ("orig.npz", "test.npz", "syn.npz")]
    for i, path in enumerate(paths):
        make_npz(path, 64, seed=i)
    config = smoke_config(**{"data.name": "npz", "data.original": paths[0], "data.test": paths[1]})
    config.data.synthetic = (paths[2],)
    workdir = tmp_path / "run"
    check_run(config, str(workdir), available_devices=4)
    run_dir.record_inputs(str(workdir), run_dir.check_inputs(str(workdir), paths))
    check_run(config, str(workdir), available_devices=4)  # unchanged inputs pass
    make_npz(paths[2], 64, seed=9)  # same size, other images and labels
    with pytest.raises(ConfigError, match=f"input file.*changed.*\n  {paths[2]}\n"):
        check_run(config, str(workdir), available_devices=4)


@pytest.mark.slow
def test_the_command_line_prints_one_message_without_traceback_and_exits_2(tmp_path):
    bad = subprocess.run(
        main_command(tmp_path / "run", "--config.attack.eps=-1", "--config.pruning.strategy=pumaa"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert (
        "error: 2 problem(s)" in bad.stderr
        and "attack.eps=-1.0" in bad.stderr
        and "pruning.strategy='pumaa'" in bad.stderr
    )
    assert not (tmp_path / "run").exists()
    verbose = subprocess.run(
        main_command(tmp_path / "run", "--config.attack.eps=-1", "--verbose"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr and "ConfigError" in verbose.stderr
    typo = subprocess.run(
        main_command(tmp_path / "run", "--config.train.bacth_size=8"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert typo.returncode == 2 and "Traceback" not in typo.stderr and "bacth_size" in typo.stderr
    assert not (tmp_path / "run").exists()
