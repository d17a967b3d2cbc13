"""`ctscan ensemble`: several checkpoints (and flips) as one checkpoint every command takes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from ctscan.data.store import load_store
from ctscan.engine.checkpoint import read_checkpoint, save_checkpoint
from ctscan.engine.evaluate import evaluate_checkpoint
from ctscan.engine.runtime import resolve_runtime
from ctscan.engine.train import run_training
from ctscan.errors import CheckpointError, CtscanError
from ctscan.inference.predictor import open_predictor
from ctscan.models.ensemble import Ensemble, Member
from ctscan.ops.ensemble import build_ensemble, member_paths
from ctscan.ops.export import export_metadata, write_onnx
from ctscan.settings import load_settings
from tests.serve_helpers import png_bytes
from tests.unit.conftest_store import engine_overrides, engine_settings, write_synthetic_store

SIZE = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two cnn_gap models (seeds 0, 1) and one on another store (48 px), 1 epoch each."""
    root = tmp_path_factory.mktemp("ensemble")
    store = write_synthetic_store(root / "processed", size=SIZE)
    other = write_synthetic_store(root / "processed48", size=48)
    out: dict[str, Path] = {"store": store, "root": root}
    for name, seed, st, size in (("a", 0, store, SIZE), ("b", 1, store, SIZE), ("c", 0, other, 48)):
        settings = engine_settings(
            st, root / "runs", size, **{"train.epochs": 1, "train.seed": seed}
        )
        run_training(settings, out_dir=root / name)
        out[name] = root / name / "best.pt"
    return out


def _settings(trained: dict[str, Path]):
    return load_settings([], engine_overrides(trained["store"], trained["root"] / "runs", SIZE))


def _probs(model: Path, settings, images: np.ndarray, backend: str = "torch") -> np.ndarray:
    return open_predictor(model, settings=settings, backend=backend).probabilities(images)


def _test_images(trained: dict[str, Path]) -> np.ndarray:
    return load_store(trained["store"]).split("test").images.numpy()


def test_the_ensemble_answers_the_mean_of_its_members_over_the_flips(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    settings = _settings(trained)
    images = _test_images(trained)
    flipped = {"hflip": images[..., ::-1].copy(), "vflip": images[..., ::-1, :].copy()}
    result = build_ensemble(
        settings, [trained["a"], trained["b"]], out=tmp_path / "e" / "ens.pt", flips=("hflip",)
    )
    got = _probs(result.checkpoint, settings, images)
    views = [images, flipped["hflip"]]
    expected = np.mean([_probs(trained[m], settings, v) for m in ("a", "b") for v in views], axis=0)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    both = build_ensemble(
        settings, [trained["a"]], out=tmp_path / "f" / "ens.pt", flips=("vflip", "hflip")
    )
    assert read_checkpoint(both.checkpoint).flips == ("hflip", "vflip")  # FLIPS order
    expected = np.mean(
        [_probs(trained["a"], settings, v) for v in (images, *flipped.values())], axis=0
    )
    np.testing.assert_allclose(_probs(both.checkpoint, settings, images), expected, atol=1e-6)


def test_one_member_without_flips_is_the_member(trained: dict[str, Path], tmp_path: Path) -> None:
    settings = _settings(trained)
    images = _test_images(trained)
    result = build_ensemble(settings, [trained["a"]], out=tmp_path / "one" / "ens.pt")
    np.testing.assert_allclose(
        _probs(result.checkpoint, settings, images),
        _probs(trained["a"], settings, images),
        atol=1e-6,
    )
    ckpt = read_checkpoint(result.checkpoint)
    assert ckpt.is_ensemble and ckpt.model_name == "ensemble" and ckpt.temperature == 1.0
    assert ckpt.members[0]["temperature"] == read_checkpoint(trained["a"]).temperature
    # serve's drift reference for the ensemble itself, beside it
    assert result.reference == tmp_path / "one" / "reference_confidence.json"
    assert result.reference.is_file()


def test_evaluate_export_and_serve_take_an_ensemble(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    from ctscan.serve.app import create_app
    from ctscan.serve.server import build_service

    settings = _settings(trained)
    ens = build_ensemble(
        settings, [trained["a"], trained["b"]], out=tmp_path / "e" / "ens.pt", flips=("hflip",)
    ).checkpoint
    store = load_store(trained["store"])
    report = evaluate_checkpoint(
        read_checkpoint(ens),
        store=store,
        split="test",
        rt=resolve_runtime(settings.train),
        out_dir=None,
    )
    images = _test_images(trained)
    torch_probs = _probs(ens, settings, images)
    rows = np.array([list(p["probabilities"].values()) for p in report["predictions"]])
    np.testing.assert_allclose(rows, torch_probs, atol=1e-6)
    assert report["model_name"] == "ensemble"
    # ONNX: one graph holding both members and the flip
    onnx = tmp_path / "ens.onnx"
    ckpt = read_checkpoint(ens)
    from ctscan.engine.checkpoint import load_model

    meta = export_metadata(ckpt, checkpoint_sha256="x", fmt="onnx")
    write_onnx(load_model(ckpt).deployable(), onnx, size=SIZE, meta=meta)
    np.testing.assert_allclose(_probs(onnx, settings, images, "onnx"), torch_probs, atol=1e-4)
    # the server: /predict and a Grad-CAM /explain of the ensemble
    service = build_service(
        str(ens),
        load_settings(
            [],
            [
                *engine_overrides(trained["store"], trained["root"] / "runs", SIZE),
                'serve.backend="torch"',
            ],
        ),
    )
    with TestClient(create_app(service)) as client:
        data = png_bytes(images[0, 0])
        reply = client.post("/predict", files={"file": ("a.png", data)})
        assert reply.status_code == 200, reply.text
        np.testing.assert_allclose(
            list(reply.json()["probabilities"].values()), torch_probs[0], atol=1e-5
        )
        cam = client.post("/explain", files={"file": ("a.png", data)})
        assert cam.status_code == 200 and cam.content.startswith(b"\x89PNG")


def test_the_ensembles_grad_cam_is_the_mean_of_its_members() -> None:
    from ctscan.inference.explain import cam_function, grad_cam
    from ctscan.models import build_model, gradcam_layer

    torch.manual_seed(0)
    nets = [build_model("cnn_gap", num_classes=4, image_size=SIZE).eval() for _ in range(2)]
    ensemble = Ensemble([Member(n, "cnn_gap", 1.5) for n in nets], ("hflip",)).eval()
    x = torch.randn(1, 1, SIZE, SIZE)
    heat, index = cam_function(ensemble, "ensemble")(x, None)
    assert index == int(ensemble(x)[0].argmax())
    maps = [grad_cam(m, x, gradcam_layer(m.net, "cnn_gap"), index)[0] for m in ensemble.members]
    mean = np.mean(maps, axis=0)
    np.testing.assert_allclose(heat, mean / mean.max() if mean.max() > 0 else mean, atol=1e-6)


def test_member_paths_expand_cv_and_run_folders(tmp_path: Path) -> None:
    for k in (1, 2, 10, 9):
        (tmp_path / "cv" / f"fold-{k}").mkdir(parents=True)
        (tmp_path / "cv" / f"fold-{k}" / "best.pt").write_bytes(b"x")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(b"x")
    got = member_paths([tmp_path / "cv", tmp_path / "run"])
    assert [p.parent.name for p in got] == ["fold-1", "fold-2", "fold-9", "fold-10", "run"]
    (tmp_path / "cv" / "fold-x").mkdir()  # not a fold folder: not a member, not a traceback
    (tmp_path / "cv" / "fold-x" / "best.pt").write_bytes(b"x")
    (tmp_path / "cv" / "fold-1-old").mkdir()
    (tmp_path / "cv" / "fold-1-old" / "best.pt").write_bytes(b"x")
    assert member_paths([tmp_path / "cv"]) == got[:4]
    (tmp_path / "empty" / "fold-x").mkdir(parents=True)
    (tmp_path / "empty" / "fold-x" / "best.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="neither fold"):
        member_paths([tmp_path / "empty"])


def test_bad_ensembles_are_refused_with_one_line(trained: dict[str, Path], tmp_path: Path) -> None:
    settings = _settings(trained)
    a, b = trained["a"], trained["b"]
    with pytest.raises(CheckpointError, match="other preprocessing"):
        build_ensemble(settings, [a, trained["c"]], out=tmp_path / "x" / "e.pt")
    with pytest.raises(CheckpointError, match="same file"):
        build_ensemble(settings, [a, a], out=tmp_path / "x" / "e.pt")
    with pytest.raises(CtscanError, match="unknown flip 'rot90'"):
        build_ensemble(settings, [a], out=tmp_path / "x" / "e.pt", flips=("rot90",))
    with pytest.raises(CtscanError, match="in a run folder"):
        build_ensemble(settings, [a, b], out=a.parent / "ens.pt")
    with pytest.raises(CtscanError, match=r"does not end in \.pt"):
        build_ensemble(settings, [a, b], out=tmp_path / "x" / "e.onnx")
    made = build_ensemble(settings, [a, b], out=tmp_path / "y" / "e.pt").checkpoint
    with pytest.raises(CtscanError, match="exists"):
        build_ensemble(settings, [a, b], out=made)
    with pytest.raises(CheckpointError, match="itself an ensemble"):
        build_ensemble(settings, [made, a], out=tmp_path / "z" / "e.pt")
    with pytest.raises(CtscanError, match=r"already holds 'e\.pt'"):  # its reference is e.pt's
        build_ensemble(settings, [a], out=made.parent / "other.pt")
    with pytest.raises(CheckpointError, match=r"last\.pt"):
        build_ensemble(settings, [a, a.parent / "last.pt"], out=tmp_path / "z" / "e.pt")
    cuda = load_settings(
        [],
        [
            *engine_overrides(trained["store"], trained["root"] / "runs", SIZE),
            'train.device="cuda"',
        ],
    )
    if not torch.cuda.is_available():
        with pytest.raises(CtscanError, match="cuda"):
            build_ensemble(cuda, [a, b], out=tmp_path / "z" / "e.pt")
    for folder in (tmp_path / "x", tmp_path / "z"):  # nothing written by a refused run
        assert not folder.exists() or not list(folder.glob("*.pt")), list(folder.iterdir())


@pytest.mark.parametrize("stop", [KeyboardInterrupt, OSError])
def test_a_stop_between_the_two_files_leaves_neither(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: type
) -> None:
    import ctscan.files

    def fail(*args: object, **kwargs: object) -> None:
        raise stop("stopped while writing the reference")

    monkeypatch.setattr(ctscan.files, "atomic_write", fail)  # the reference's write only
    out = tmp_path / "e" / "ens.pt"
    with pytest.raises(stop):
        build_ensemble(_settings(trained), [trained["a"], trained["b"]], out=out)
    assert not out.exists() and not (out.parent / "reference_confidence.json").exists()
    monkeypatch.undo()
    assert build_ensemble(_settings(trained), [trained["a"], trained["b"]], out=out).reference


def test_a_broken_ensemble_file_is_refused(trained: dict[str, Path], tmp_path: Path) -> None:
    made = build_ensemble(_settings(trained), [trained["a"]], out=tmp_path / "e" / "e.pt")
    ckpt = read_checkpoint(made.checkpoint)
    del ckpt.members[0]["temperature"]
    save_checkpoint(tmp_path / "broken.pt", ckpt)
    with pytest.raises(CheckpointError, match="broken ensemble"):
        read_checkpoint(tmp_path / "broken.pt")
    ckpt = read_checkpoint(made.checkpoint)
    ckpt.flips = ("spin",)
    save_checkpoint(tmp_path / "flips.pt", ckpt)
    with pytest.raises(CheckpointError, match="unknown flip"):
        read_checkpoint(tmp_path / "flips.pt")


def test_the_cli_writes_an_ensemble_and_refuses_mistakes(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTSCAN_")}
    sets = [
        arg
        for item in engine_overrides(trained["store"], trained["root"] / "runs", SIZE)
        for arg in ("--set", item)
    ]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ctscan", "ensemble", *args, *sets],
            capture_output=True,
            text=True,
            env=env,
        )

    out = tmp_path / "cli" / "ens.pt"
    ok = run(str(trained["a"]), str(trained["b"].parent), "--tta", "hflip", "--out", str(out))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(out) and "2 member(s) x image + hflip" in ok.stderr
    bad = run(str(trained["a"]), str(trained["c"]), "--out", str(tmp_path / "bad" / "e.pt"))
    assert bad.returncode == 4 and "Traceback" not in bad.stderr
    assert "other preprocessing" in bad.stderr
    missing = run(str(tmp_path / "nope.pt"), "--out", str(tmp_path / "m" / "e.pt"))
    assert missing.returncode == 4 and "does not exist" in missing.stderr
