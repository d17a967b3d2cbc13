"""One input path, on the real images: a raw file read for inference equals the training input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctscan.data.preprocess import run_preprocess
from ctscan.data.store import load_store
from ctscan.data.transforms import decode_image, model_input, prepare
from ctscan.engine.evaluate import predict
from ctscan.engine.modelling import Deployable, build_model
from ctscan.engine.runtime import resolve_runtime
from ctscan.settings import TrainSettings, load_settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def store_96(real_raw_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("input-path") / "processed"
    settings = load_settings(
        [],
        [f'paths.raw_dir="{real_raw_dir}"', f'paths.processed_dir="{out}"', "data.image_size=96"],
    )
    return run_preprocess(settings).store_dir


def test_every_raw_file_through_prepare_equals_its_store_row(
    store_96: Path, real_raw_dir: Path
) -> None:
    store = load_store(store_96)
    spec = store.spec
    checked = 0
    for split in store.split_names:
        data = store.split(split)
        for i, rel in enumerate(data.paths):
            raw = prepare(real_raw_dir / rel, spec)  # the path predict and serve will take
            assert np.array_equal(raw, data.images[i, 0].numpy()), rel
            checked += 1
        # ... and the normalised model input of the two is the same tensor, for 1 and 3 channels
        raw_batch = torch.from_numpy(
            np.stack([prepare(real_raw_dir / rel, spec) for rel in data.paths[:16]])[:, None]
        )
        for channels in (1, 3):
            a = model_input(raw_batch, mean=spec.mean, std=spec.std, channels=channels)
            b = model_input(data.images[:16], mean=spec.mean, std=spec.std, channels=channels)
            assert torch.equal(a, b)
    assert checked == 944


def test_every_real_test_png_decodes_through_libspng_to_pillows_pixels(
    real_raw_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyspng

    load, decoded = pyspng.load, []
    monkeypatch.setattr(pyspng, "load", lambda data: decoded.append(1) or load(data))
    files = sorted((real_raw_dir / "test").rglob("*.png"))
    for path in files:
        got = decode_image(path)
        with Image.open(path) as expected:
            expected.load()
            assert got.mode == expected.mode and np.array_equal(got, expected), path
    assert len(files) == len(decoded) == 259  # every one through libspng, none left to Pillow


@pytest.mark.parametrize("name", ["cnn_gap", "efficientnet_lite0"])
def test_deployable_uint8_model_equals_the_evaluation_path(store_96: Path, name: str) -> None:
    """The MLflow / export module (uint8 in) gives evaluate's logits on the real test split."""
    torch.manual_seed(0)
    store = load_store(store_96)
    spec = store.spec
    net = build_model(name, num_classes=4, image_size=spec.image_size, dropout=0.2).eval()
    channels = 1 if name == "cnn_gap" else 3
    rt = resolve_runtime(TrainSettings(device="cpu", channels_last=False))
    images = store.split("test").images
    expected = predict(net, images, mean=spec.mean, std=spec.std, channels=channels, rt=rt)
    with torch.no_grad():
        got = Deployable(net, spec, channels).eval()(images)
    assert got.dtype == torch.float32 and got.shape == (259, 4)
    assert float((got - expected).abs().max()) <= 1e-5


def test_checkpoint_predictor_on_raw_files_equals_evaluate_on_the_store(
    store_96: Path, real_raw_dir: Path, tmp_path: Path
) -> None:
    """Issue 7: every real test file through the Predictor == `ctscan evaluate` on the store."""
    from ctscan.engine.evaluate import evaluate_checkpoint
    from ctscan.engine.train import run_training
    from ctscan.inference import open_predictor

    settings = load_settings(
        [],
        [
            f'paths.processed_dir="{store_96}"',
            f'paths.runs_dir="{tmp_path / "runs"}"',
            "data.image_size=96",
            'model.name="cnn_gap"',
            "model.pretrained=false",
            'train.device="cpu"',
            "train.epochs=1",
            "train.evaluate_test=false",
            "train.quiet=true",
            "train.threads=1",  # two pytest workers share the cores (tests/conftest.py)
            "tracking.enabled=false",
        ],
    )
    result = run_training(settings, out_dir=tmp_path / "run")
    store = load_store(store_96)
    report = evaluate_checkpoint(
        result.best_path,
        store=store,
        split="test",
        rt=resolve_runtime(settings.train),
        out_dir=None,
    )
    expected = {row["path"]: row for row in report["predictions"]}
    predictor = open_predictor(result.best_path, settings=settings)
    files = [real_raw_dir / rel for rel in store.split("test").paths]
    got = predictor.predict_files(files)
    assert len(got) == len(expected) == 259
    worst = 0.0
    for prediction, path in zip(got, store.split("test").paths, strict=True):
        assert prediction.error is None
        row = expected[path]
        assert prediction.label == row["label"]
        worst = max(
            worst,
            max(abs(prediction.probabilities[k] - v) for k, v in row["probabilities"].items()),
        )
    assert worst <= 1e-5
