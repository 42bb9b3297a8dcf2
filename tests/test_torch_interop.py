"""PyTorch checkpoints in and out, checked against the reference architectures written here in PyTorch.

The two classes below follow the DM-Improves-AT code (its WideResNet with manual
padding, asymmetric at stride 2, and its PreAct ResNet-18), independently of
jax_advprune.models.torch_reference.
"""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jax_advprune.models import create_model, import_torch
from jax_advprune.models.torch_export import save_state_dict, to_torch
from jax_advprune.models.torch_keys import StateDictMismatchError, state_dict_from_variables

CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))


class RefBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride, act):
        super().__init__()
        self.batchnorm_0 = nn.BatchNorm2d(in_planes, momentum=0.01)
        self.relu_0 = act()
        self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes, momentum=0.01)
        self.relu_1 = act()
        self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.has_shortcut = in_planes != out_planes
        self.shortcut = (
            nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False) if self.has_shortcut else None
        )
        self._stride = stride

    def forward(self, x):
        if self.has_shortcut:
            x = self.relu_0(self.batchnorm_0(x))
        else:
            out = self.relu_0(self.batchnorm_0(x))
        v = x if self.has_shortcut else out
        v = F.pad(v, (1, 1, 1, 1)) if self._stride == 1 else F.pad(v, (0, 1, 0, 1))
        out = self.conv_1(self.relu_1(self.batchnorm_1(self.conv_0(v))))
        return (self.shortcut(x) if self.has_shortcut else x) + out


class RefGroup(nn.Module):
    def __init__(self, n, in_planes, out_planes, stride, act):
        super().__init__()
        self.block = nn.Sequential(
            *[RefBlock(i == 0 and in_planes or out_planes, out_planes, i == 0 and stride or 1, act) for i in range(n)]
        )

    def forward(self, x):
        return self.block(x)


class RefWideResNet(nn.Module):
    def __init__(self, num_classes=10, depth=28, width=10, act=nn.SiLU, mean=CIFAR10[0], std=CIFAR10[1]):
        super().__init__()
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
        c = [16, 16 * width, 32 * width, 64 * width]
        n = (depth - 4) // 6
        self.init_conv = nn.Conv2d(3, c[0], 3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(
            RefGroup(n, c[0], c[1], 1, act), RefGroup(n, c[1], c[2], 2, act), RefGroup(n, c[2], c[3], 2, act)
        )
        self.batchnorm = nn.BatchNorm2d(c[3], momentum=0.01)
        self.relu = act()
        self.logits = nn.Linear(c[3], num_classes)
        self.num_channels = c[3]

    def forward(self, x):
        out = self.layer(self.init_conv((x - self.mean) / self.std))
        out = F.avg_pool2d(self.relu(self.batchnorm(out)), 8)
        return self.logits(out.view(-1, self.num_channels))


class RefPreActBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class RefPreActResNet18(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.layer1, self.layer2 = self._make_layer(64, 1), self._make_layer(128, 2)
        self.layer3, self.layer4 = self._make_layer(256, 2), self._make_layer(512, 2)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes, stride):
        layers = []
        for s in (stride, 1):
            layers.append(RefPreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        out = F.avg_pool2d(F.relu(self.bn(out)), 4)
        return self.linear(out.view(out.size(0), -1))


def randomised(module: nn.Module, seed: int) -> nn.Module:
    """Random weights and random BatchNorm statistics, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.dtype.is_floating_point:
                noise = torch.randn(tensor.shape, generator=generator) * 0.1
                tensor.copy_(
                    noise.abs() + 0.5
                    if name.endswith("running_var")
                    else noise + (1.0 if name.endswith(".weight") and tensor.ndim == 1 else 0.0)
                )
    return module.eval()


def flax_logits(model, variables, x_nchw: np.ndarray) -> np.ndarray:
    return np.asarray(model.apply(variables, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), train=False))


def saved_like_dm_improves_at(backbone: nn.Module, path) -> None:
    """DM-Improves-AT: DataParallel(Sequential(backbone)), torch.save({'model_state_dict': ...})."""
    torch.save({"model_state_dict": nn.DataParallel(nn.Sequential(backbone)).state_dict()}, path)


X = np.random.default_rng(0).uniform(0, 1, (4, 3, 32, 32)).astype(np.float32)


@pytest.mark.parametrize("depth,width,act,activation", [(16, 2, nn.SiLU, "swish"), (10, 1, nn.ReLU, "relu")])
def test_a_dm_improves_at_wide_resnet_checkpoint_imports_with_equal_logits(tmp_path, depth, width, act, activation):
    reference = randomised(RefWideResNet(depth=depth, width=width, act=act), seed=depth)
    saved_like_dm_improves_at(reference, tmp_path / "model.pt")
    model, variables = import_torch(
        str(tmp_path / "model.pt"), name="wide_resnet", depth=depth, width=width, activation=activation
    )
    with torch.no_grad():
        expected = reference(torch.tensor(X)).numpy()
    np.testing.assert_allclose(flax_logits(model, variables, X), expected, atol=1e-4, rtol=1e-4)


def test_a_preact_resnet18_checkpoint_imports_with_equal_logits(tmp_path):
    reference = randomised(RefPreActResNet18(), seed=3)
    torch.save(reference.state_dict(), tmp_path / "bare.pt")  # a bare state dict this time
    model, variables = import_torch(str(tmp_path / "bare.pt"), name="preact_resnet18")
    with torch.no_grad():
        expected = reference(torch.tensor(X)).numpy()
    np.testing.assert_allclose(flax_logits(model, variables, X), expected, atol=1e-4, rtol=1e-4)


def test_wrappers_safetensors_and_normalisation_by_dataset(tmp_path):
    reference = randomised(
        RefWideResNet(depth=10, width=1, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)), seed=5
    )
    state = {f"module.1.{k}": v for k, v in reference.state_dict().items()}  # Sequential(Normalization, backbone)
    state["module.0.mean"] = torch.zeros(3)
    torch.save({"state_dict": state}, tmp_path / "wrapped.pt")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with torch.no_grad():
        expected = reference(torch.tensor(X)).numpy()
    for source in (str(tmp_path / "wrapped.pt"), str(tmp_path / "model.safetensors"), reference.state_dict()):
        model, variables = import_torch(source, name="wide_resnet", depth=10, width=1, dataset="cifar100")
        np.testing.assert_allclose(flax_logits(model, variables, X), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(StateDictMismatchError, match="missing layer.0.block.0.conv_0.weight"):
        broken = {k: v for k, v in reference.state_dict().items() if k != "layer.0.block.0.conv_0.weight"}
        import_torch(broken, name="wide_resnet", depth=10, width=1)
    with pytest.raises(StateDictMismatchError, match="shape"):
        import_torch(reference.state_dict(), name="wide_resnet", depth=10, width=2)


@pytest.mark.parametrize(
    "name,kwargs", [("wide_resnet", dict(depth=10, width=2, activation="relu")), ("preact_resnet18", dict(width=8))]
)
@pytest.mark.slow
def test_export_then_import_is_bitwise_and_to_torch_pickles(tmp_path, name, kwargs):
    model = create_model(name, num_classes=10, **kwargs)
    x = jnp.asarray(X.transpose(0, 2, 3, 1))
    variables = model.init(jax.random.PRNGKey(1), x)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])  # non-trivial statistics
    variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
    for suffix in (".pt", ".safetensors"):
        save_state_dict(state_dict_from_variables(model, variables), str(tmp_path / f"model{suffix}"))
        _, imported = import_torch(
            str(tmp_path / f"model{suffix}"), name=name, mean=model.mean, std=model.std, **kwargs
        )
        for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(imported)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    module = to_torch(model, variables)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        np.testing.assert_allclose(
            restored(torch.tensor(X)).numpy(), flax_logits(model, variables, X), atol=1e-4, rtol=1e-4
        )
    assert {"mean", "std"} <= dict(restored.named_buffers()).keys() and "mean" not in restored.state_dict()
    if name == "wide_resnet":  # the exported keys load strictly into the reference architecture
        reference = RefWideResNet(depth=10, width=2, act=nn.ReLU, mean=model.mean, std=model.std).eval()
        reference.load_state_dict(torch.load(tmp_path / "model.pt"))
        with torch.no_grad():
            np.testing.assert_allclose(
                reference(torch.tensor(X)).numpy(), flax_logits(model, variables, X), atol=1e-4, rtol=1e-4
            )


@pytest.mark.slow
def test_puma_scores_with_an_imported_dm_improves_at_checkpoint_without_training_a_scoring_model(tmp_path):
    """The README's PyTorch path on configs/cifar10_puma.py:smoke: margins from a reference WRN-10-1 checkpoint."""
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    reference = randomised(RefWideResNet(depth=10, width=1, act=nn.SiLU), seed=11)
    saved_like_dm_improves_at(reference, tmp_path / "robust.pt")
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jax_advprune.main",
            "--config",
            os.path.join(repo, "configs/cifar10_puma.py:smoke"),
            "--workdir",
            str(workdir),
            "--phases=score,select",
            f"--config.scoring.init_from={tmp_path / 'robust.pt'}",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    meta = json.load(open(workdir / "scores" / "meta.json"))
    assert meta["init_from"] == str(tmp_path / "robust.pt") and "model_checkpoints" not in meta
    assert not (workdir / "scoring_model").exists() and not (workdir / "checkpoints").exists()
    margin = np.load(workdir / "scores" / "margin.npy")
    assert np.isfinite(margin).sum() == len(margin) - 64  # every trainable row scored (64 held out for validation)
    assert (workdir / "selection" / "keep.npy").exists() and not (workdir / "results.json").exists()
    assert str(tmp_path / "robust.pt") in json.load(
        open(workdir / "settings" / "inputs.json")
    )  # fingerprinted like the data
