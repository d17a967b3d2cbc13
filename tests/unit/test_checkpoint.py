"""Checkpoints: atomic writes; truncated, foreign, code-carrying or mismatched files refused."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from ctscan.data.transforms import PreprocessSpec
from ctscan.engine.checkpoint import (
    Checkpoint,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from ctscan.engine.modelling import load_model_state
from ctscan.errors import CheckpointError
from ctscan.models import build_model, unwrap

SPEC = {
    "image_size": 32,
    "resize": "pad",
    "mean": 0.2,
    "std": 0.3,
    "class_names": ["a", "b", "c", "d"],
    "channels": 1,
}


def _checkpoint(model: torch.nn.Module, name: str = "cnn_gap", **more: object) -> Checkpoint:
    return Checkpoint(
        kind="best",
        model_name=name,
        spec=PreprocessSpec.from_dict(SPEC),
        model_state=model.state_dict(),
        settings={"model": {"dropout": 0.2}},
        epoch=1,
        **more,
    )


def test_round_trip_and_rebuild(tmp_path: Path) -> None:
    model = build_model("cnn_gap")
    path = save_checkpoint(tmp_path / "c.pt", _checkpoint(model))
    loaded = load_model(path)
    assert loaded.checkpoint.source == path and loaded.spec == PreprocessSpec.from_dict(SPEC)
    assert loaded.channels == 1 and not loaded.model.training
    x = torch.randn(2, 1, 32, 32)
    model.eval()
    assert torch.equal(model(x), loaded.model(x))
    assert not list(tmp_path.glob(".*.tmp"))  # no temp file left behind


def test_compiled_and_wrapped_models_unwrap() -> None:
    model = build_model("cnn_gap")
    assert unwrap(torch.compile(model)) is model


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.pt", _checkpoint(build_model("cnn_gap")))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(path)


class _Evil:
    def __reduce__(self):  # runs on unpickling if anything unpickles it without weights_only
        return (Path.touch, (Path(self.marker),))


def test_pickle_with_code_is_refused_and_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = str(marker)
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "payload": evil}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(path)
    assert not marker.exists()


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="not a ctscan checkpoint"):
        read_checkpoint(plain)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        read_checkpoint(text)


def test_other_model_or_shape_is_refused(tmp_path: Path) -> None:
    state = build_model("cnn_gap").state_dict()
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model_state(build_model("resnet18"), state, source="x.pt")
    cnn64 = build_model("cnn", image_size=64).state_dict()
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_model_state(build_model("cnn", image_size=32), cnn64, source="x.pt")


def test_unknown_model_name_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.pt", _checkpoint(build_model("cnn_gap"), name="vgg99"))
    with pytest.raises(CheckpointError, match="unknown model 'vgg99'"):
        read_checkpoint(path)


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.pt", _checkpoint(build_model("cnn_gap")))
    before = path.read_bytes()

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(path, _checkpoint(build_model("cnn_gap"), history=[{"x": Boom()}]))
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_ctrl_c_during_a_checkpoint_write_waits_for_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.save turned an exception raised inside its write into a RuntimeError."""
    import signal

    real_save = torch.save

    def save_interrupted(obj: object, fh: object) -> None:
        signal.raise_signal(signal.SIGINT)  # the handler would run inside torch's writer
        real_save(obj, fh)

    monkeypatch.setattr(torch, "save", save_interrupted)
    with pytest.raises(KeyboardInterrupt):  # after the write, not a RuntimeError inside it
        save_checkpoint(tmp_path / "c.pt", _checkpoint(build_model("cnn_gap")))
    monkeypatch.setattr(torch, "save", real_save)
    assert read_checkpoint(tmp_path / "c.pt").model_name == "cnn_gap"  # whole, in place
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left
