"""Grad-CAM: it points at the evidence a trained model uses, on every registry model, cleanly."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ctscan.data.transforms import model_input
from ctscan.inference.explain import TITLE_HEIGHT, grad_cam, jet, overlay_png
from ctscan.models import (
    GRADCAM_LAYERS,
    MODEL_NAMES,
    build_model,
    gradcam_layer,
    input_channels,
    train_mode,
)

SIZE = 32  # side of the synthetic images
SIDE = 10  # side of the bright square; a quadrant is 16 px, so it sits at offsets 0..6 in it
EMPTY = 4  # the class of images without a square (so that no class is learnt by elimination)
MEAN, STD = 0.4, 0.2


def quadrant_images(
    n: int, rng: np.random.Generator, *, with_empty: bool
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Noisy slices whose class is the quadrant of a bright square (or EMPTY: no square).

    Every image also holds a dimmer square (a distractor) in another quadrant. Returns uint8
    images (n, 1, SIZE, SIZE), labels (n,) and the top-left corner of each bright square.
    """
    half = SIZE // 2
    images = rng.normal(0.35, 0.08, (n, SIZE, SIZE))
    labels = rng.integers(0, 5 if with_empty else 4, n)
    corners: list[tuple[int, int]] = []

    def corner(quadrant: int) -> tuple[int, int]:
        qy, qx = divmod(quadrant, 2)
        return (
            qy * half + int(rng.integers(0, half - SIDE + 1)),
            qx * half + int(rng.integers(0, half - SIDE + 1)),
        )

    for i, label in enumerate(labels.tolist()):
        other = int(rng.integers(0, 4)) if label == EMPTY else (label + int(rng.integers(1, 4))) % 4
        y, x = corner(other)
        images[i, y : y + SIDE, x : x + SIDE] = 0.65
        y, x = corner(label) if label != EMPTY else (-SIZE, -SIZE)
        if label != EMPTY:
            images[i, y : y + SIDE, x : x + SIDE] = 1.0
        corners.append((y, x))
    gray = np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)
    return torch.from_numpy(gray[:, None]), torch.from_numpy(labels), corners


class CoordNet(nn.Module):
    """3 conv layers on the image plus (y, x) coordinate channels, then GAP -> linear.

    The coordinate channels let a GAP head tell quadrants apart; the last conv layer (16x16)
    is the Grad-CAM target.
    """

    def __init__(self, width: int = 8, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w).view(1, 1, 1, w).expand(b, 1, h, w)
        return self.head(self.features(torch.cat([x, ys, xs], dim=1)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def quadrant_model() -> Iterator[tuple[CoordNet, torch.Tensor, torch.Tensor, list]]:
    """A CoordNet trained on 320 quadrant images (10 epochs, ~2 s on one thread), 64 held out."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is faster on a shared CPU
    try:
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        train_images, train_labels, _ = quadrant_images(320, rng, with_empty=True)
        test_images, test_labels, corners = quadrant_images(64, rng, with_empty=False)
        model = CoordNet()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        x = model_input(train_images, mean=MEAN, std=STD)
        for _ in range(10):
            order = torch.randperm(len(x))
            for start in range(0, len(x), 32):
                batch = order[start : start + 32]
                loss = nn.functional.cross_entropy(model(x[batch]), train_labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        yield model, model_input(test_images, mean=MEAN, std=STD), test_labels, corners
    finally:
        torch.set_num_threads(threads)


def _inside(heat: np.ndarray, corner: tuple[int, int]) -> bool:
    py, px = np.unravel_index(int(np.argmax(heat)), heat.shape)
    y, x = corner
    return y <= py < y + SIDE and x <= px < x + SIDE


@pytest.mark.slow  # trains a tiny model: ~2 s alone, up to ~10 s on a busy CPU
def test_grad_cam_peak_falls_inside_the_square(quadrant_model) -> None:
    model, x, labels, corners = quadrant_model
    with torch.no_grad():
        accuracy = (model(x).argmax(dim=1) == labels).float().mean().item()
    assert accuracy >= 0.9, f"the tiny model did not learn the task (accuracy {accuracy:.2f})"
    hits = []
    for i, corner in enumerate(corners):
        heat, _ = grad_cam(model, x[i : i + 1], model.features[-1])
        hits.append(_inside(heat, corner))
    rate = float(np.mean(hits))
    assert rate >= 0.9, f"Grad-CAM peak inside the square on {rate:.0%} of {len(hits)} images"


@pytest.mark.slow  # trains a tiny model: ~2 s alone, up to ~10 s on a busy CPU
def test_grad_cam_of_another_class_does_not_point_at_the_square(quadrant_model) -> None:
    model, x, labels, corners = quadrant_model
    hits = []
    for i, corner in enumerate(corners):
        wrong = (int(labels[i]) + 1 + i % 3) % 4  # another quadrant's class
        heat, index = grad_cam(model, x[i : i + 1], model.features[-1], wrong)
        assert index == wrong
        hits.append(_inside(heat, corner))
    rate = float(np.mean(hits))
    assert rate <= 0.5, f"another class's Grad-CAM peaks in the square on {rate:.0%} of images"


@pytest.fixture(scope="module")
def registry_models() -> dict[str, nn.Module]:
    """Every registry model, random weights, built for 64 px inputs."""
    torch.manual_seed(0)
    return {name: build_model(name, num_classes=4, image_size=64) for name in MODEL_NAMES}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_grad_cam_on_every_registry_model(name: str, registry_models) -> None:
    model = registry_models[name]
    model.train()
    layer = gradcam_layer(model, name)
    x = model_input(
        torch.randint(0, 256, (1, 1, 64, 64), dtype=torch.uint8),
        mean=MEAN,
        std=STD,
        channels=input_channels(name),
    )
    with torch.inference_mode():  # as a caller that predicted first might hold it
        heat, index = grad_cam(model, x, layer)
    assert heat.shape == (64, 64) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() >= 0.0 and heat.max() <= 1.0
    assert heat.max() in (0.0, 1.0)  # normalised by its maximum, or all zero
    assert all(m.training for m in model.modules())  # train mode given back
    assert not layer._forward_hooks and not layer._backward_hooks
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert index == int(model(x).argmax())  # None explains the prediction (eval mode)
    assert grad_cam(model, x, layer, class_index=1)[1] == 1
    assert not all(m.training for m in model.modules())


def test_grad_cam_keeps_existing_grads_frozen_batch_norm_and_removes_hooks_on_error() -> None:
    torch.manual_seed(0)
    model = build_model("cnn_gap", num_classes=4)
    for p in model.features.parameters():
        p.requires_grad_(False)
    train_mode(model)  # frozen BatchNorm stays in eval inside a training model
    modes = {name: m.training for name, m in model.named_modules()}
    assert not all(modes.values())
    grads = {name: torch.full_like(p, 0.5) for name, p in model.head.named_parameters()}
    for name, p in model.head.named_parameters():
        p.grad = grads[name].clone()
    layer = gradcam_layer(model, "cnn_gap")
    x = torch.randn(1, 1, 64, 64)

    heat, _ = grad_cam(model, x, layer, class_index=2)  # the graph reaches a frozen layer
    assert heat.max() in (0.0, 1.0) and np.isfinite(heat).all()
    assert {name: m.training for name, m in model.named_modules()} == modes
    for name, p in model.head.named_parameters():
        assert torch.equal(p.grad, grads[name])
    assert all(p.grad is None for p in model.features.parameters())

    with pytest.raises(ValueError, match="class_index 7"):
        grad_cam(model, x, layer, class_index=7)
    assert not layer._forward_hooks
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_grad_cam_refuses_a_layer_outside_the_model_and_a_batch() -> None:
    model = build_model("cnn_gap", num_classes=4)
    stranger = nn.Conv2d(1, 1, 3)
    with pytest.raises(ValueError, match="did not run"):
        grad_cam(model, torch.randn(1, 1, 64, 64), stranger)
    assert not stranger._forward_hooks
    with pytest.raises(ValueError, match=r"\(1, C, S, S\)"):
        grad_cam(model, torch.randn(2, 1, 64, 64), model.features[-1])


def test_gradcam_layer_names_a_spatial_layer_of_each_model(registry_models) -> None:
    assert set(GRADCAM_LAYERS) == set(MODEL_NAMES)
    for name, model in registry_models.items():
        compiled = nn.Module()
        compiled._orig_mod = model  # how torch.compile wraps a model
        layer = gradcam_layer(compiled, name)  # wrappers are looked through
        assert layer is model.get_submodule(GRADCAM_LAYERS[name])
        out: list[torch.Tensor] = []
        handle = layer.register_forward_hook(lambda m, a, o, out=out: out.append(o))
        try:
            model.eval()
            with torch.no_grad():
                model(torch.randn(1, input_channels(name), 64, 64))
        finally:
            handle.remove()
        assert out[-1].ndim == 4 and out[-1].shape[-1] >= 2, name  # (1, K, h, w) at 64 px
    with pytest.raises(ValueError, match="layer4"):
        gradcam_layer(registry_models["cnn"], "resnet18")
    with pytest.raises(ValueError, match="unknown model"):
        gradcam_layer(registry_models["cnn"], "resnet50")


def test_jet_runs_from_blue_to_red() -> None:
    colours = jet(np.linspace(0.0, 1.0, 11)).astype(int)  # (11, 3)
    assert colours.shape == (11, 3) and jet(np.zeros((2, 3))).shape == (2, 3, 3)
    assert tuple(colours[0]) == (0, 0, 128) and tuple(colours[-1]) == (128, 0, 0)
    assert tuple(colours[5]) == (128, 255, 128)
    dominant = colours[:, ::-1].argmax(axis=1)  # 0 blue, 1 green, 2 red
    assert (np.diff(dominant) >= 0).all() and dominant[0] == 0 and dominant[-1] == 2


@pytest.mark.parametrize(
    ("side", "expected"), [(32, (256, 256)), (160, (320, 320)), (300, (300, 300))]
)
def test_overlay_png_size_colours_and_title(side: int, expected: tuple[int, int]) -> None:
    gray = np.full((side, side), 100, dtype=np.uint8)
    heat = np.zeros((side, side), dtype=np.float32)
    heat[:, side // 2 :] = 1.0  # right half hot
    png = overlay_png(gray, heat, title="adenocarcinoma 97.1%")
    assert png.startswith(b"\x89PNG")
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == (expected[0], expected[1] + TITLE_HEIGHT)
        pixels = np.asarray(im).astype(int)
    image = pixels[TITLE_HEIGHT:]
    w = image.shape[1]
    cold, hot = image[:, w // 8], image[:, -w // 8]  # columns well inside each half
    assert (cold[:, 2] > cold[:, 0] + 30).all()  # blue over the cold half
    assert (hot[:, 0] > hot[:, 2] + 30).all()  # red over the hot half
    band = pixels[:TITLE_HEIGHT]
    assert band.max() > 200 and (band == 0).mean() > 0.5  # white text on a black band


def test_overlay_png_refuses_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="same shape"):
        overlay_png(np.zeros((8, 8), np.uint8), np.zeros((4, 4)), title="x")
    with pytest.raises(ValueError, match="uint8"):
        overlay_png(np.zeros((8, 8), np.float32), np.zeros((8, 8)), title="x")


def test_grad_cam_runs_the_model_under_a_compile_wrapper() -> None:
    model = build_model("cnn_gap", num_classes=4)
    compiled = nn.Module()  # has no forward of its own: calling it would raise
    compiled._orig_mod = model  # how torch.compile wraps a model
    x = torch.randn(1, 1, 64, 64)
    heat, index = grad_cam(compiled, x, gradcam_layer(compiled, "cnn_gap"))
    expected, expected_index = grad_cam(model, x, gradcam_layer(model, "cnn_gap"))
    assert index == expected_index
    np.testing.assert_array_equal(heat, expected)
