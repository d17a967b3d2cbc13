"""The training loop on a synthetic store: learning, checkpoints, resume, precision, errors."""

from __future__ import annotations

import itertools
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctscan.engine.checkpoint import read_checkpoint
from ctscan.engine.state import ema_decay_at, ema_update, lr_factor
from ctscan.engine.train import RunHooks, run_training
from ctscan.errors import CheckpointError, CtscanError, Terminated
from tests.processes import ctscan, ctscan_in_process, ctscan_stopped
from tests.unit.conftest_store import engine_overrides, engine_settings


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path).model_state


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lr_factor_warmup_then_cosine() -> None:
    assert lr_factor(0, warmup=4, total=20) == pytest.approx(0.25)
    assert lr_factor(3, warmup=4, total=20) == pytest.approx(1.0)
    assert lr_factor(4, warmup=4, total=20) == pytest.approx(1.0)
    assert lr_factor(12, warmup=4, total=20) == pytest.approx(0.5)
    assert lr_factor(20, warmup=4, total=20) == pytest.approx(0.0, abs=1e-12)
    values = [lr_factor(s, warmup=0, total=10) for s in range(11)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def _ema_of(weights: list[float], *, decay: float, warmup: bool) -> float:
    """What AveragedModel + `ema_update` hold after seeing `weights` in turn (one scalar)."""
    from torch.optim.swa_utils import AveragedModel

    net = torch.nn.Linear(1, 1, bias=False)
    ema = AveragedModel(net, multi_avg_fn=ema_update(decay, warmup=warmup), use_buffers=True)
    for w in weights:
        net.weight.data.fill_(w)
        ema.update_parameters(net)
    return float(ema.module.weight)


def test_ema_warmup_ramps_the_decay_and_forgets_the_start() -> None:
    assert ema_decay_at(1, 0.99, warmup=True) == pytest.approx(2 / 11)
    assert ema_decay_at(90, 0.99, warmup=True) == pytest.approx(91 / 100)
    assert ema_decay_at(5000, 0.99, warmup=True) == 0.99  # capped at train.ema_decay
    assert ema_decay_at(1, 0.99, warmup=False) == 0.99
    # By hand: the first update copies, update n (n >= 1 earlier ones) uses ema_decay_at(n).
    weights = [float(t) for t in range(30)]
    expected = weights[0]
    for n, w in enumerate(weights[1:], start=1):
        d = min(0.99, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * w
    assert _ema_of(weights, decay=0.99, warmup=True) == pytest.approx(expected, rel=1e-6)
    # 10 epochs of this data set (190 steps) after a start at 0, the weights then at 1: without
    # the warm-up the average still holds 0.99^190 = 15 % of the start, with it next to none.
    steps = [0.0] + [1.0] * 190
    assert _ema_of(steps, decay=0.99, warmup=False) == pytest.approx(1 - 0.99**190, rel=1e-5)
    assert _ema_of(steps, decay=0.99, warmup=True) > 0.999


def test_ema_without_warmup_is_torchs_ema() -> None:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ours = AveragedModel(net, multi_avg_fn=ema_update(0.9, warmup=False), use_buffers=True)
    theirs = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(5):
        net(torch.randn(8, 3))  # moves the BatchNorm statistics (buffers, averaged too)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ours.update_parameters(net)
        theirs.update_parameters(net)
    a, b = ours.module.state_dict(), theirs.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loop_learns_the_synthetic_task(synthetic_store: Path, tmp_path: Path) -> None:
    settings = engine_settings(synthetic_store, tmp_path / "runs", **{"train.epochs": 6})
    result = run_training(settings, out_dir=tmp_path / "run")
    assert result is not None
    first, last = result.history[0], result.history[-1]
    assert last["train_loss"] < first["train_loss"]
    assert last["train_accuracy"] >= 0.9
    assert result.best_value >= 0.9  # val macro-F1
    assert result.test is not None and result.test["accuracy"] >= 0.9
    # The leaked test image is excluded from the leak-free report.
    assert result.test["leak_free_excluded"] == 1
    assert result.test["leak_free"]["n"] == result.test["n"] - 1
    for name in ("best.pt", "last.pt", "settings.toml", "curves.png"):
        assert (tmp_path / "run" / name).is_file()
    assert (tmp_path / "run" / "eval-test" / "evaluation.json").is_file()


# Pretrained EfficientNet-Lite0: the backbone frozen for epoch 1, the stem and stages 0-1 always.
_FROZEN_TWO = {
    "model.name": '"efficientnet_lite0"',
    "model.pretrained": "true",
    "model.freeze_epochs": 1,
    "model.frozen_stages": 2,
    "train.epochs": 2,
    "train.evaluate_test": "false",
}


def _check_stages_0_1_untrained(last: Path) -> None:
    from ctscan.models import build_model

    trained = _weights(last)
    start = build_model("efficientnet_lite0", pretrained=True).state_dict()
    frozen = [k for k in start if k.startswith(("conv_stem.", "bn1.", "blocks.0.", "blocks.1."))]
    thawed = [k for k in start if k.startswith("blocks.2.") and k.endswith("weight")]
    assert frozen and all(torch.equal(trained[k], start[k]) for k in frozen)  # BN stats too
    assert thawed and not any(torch.equal(trained[k], start[k]) for k in thawed)


def test_frozen_stages_keep_their_imagenet_weights(synthetic_store: Path, tmp_path: Path) -> None:
    extra = {**_FROZEN_TWO, "train.ema": "false"}
    run_training(
        engine_settings(synthetic_store, tmp_path / "runs", **extra), out_dir=tmp_path / "run"
    )
    _check_stages_0_1_untrained(tmp_path / "run" / "last.pt")


def test_checkpoint_holds_unwrapped_state_and_metadata(
    synthetic_store: Path, tmp_path: Path
) -> None:
    settings = engine_settings(
        synthetic_store, tmp_path / "runs", **{"train.epochs": 2, "train.evaluate_test": "false"}
    )
    run_training(settings, out_dir=tmp_path / "run")
    last = read_checkpoint(tmp_path / "run" / "last.pt")
    assert last.kind == "last" and last.resumable
    assert last.epoch == 2 and len(last.history) == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in last.model_state)
    assert last.training is not None
    for key in ("model_state", "optimizer", "scheduler", "scaler", "rng", "ema_state"):
        assert key in last.training
    assert last.class_names == (
        "adenocarcinoma",
        "large_cell_carcinoma",
        "squamous_cell_carcinoma",
        "normal",
    )
    assert last.spec.image_size == 32
    assert last.settings["model"]["name"] == "cnn_gap"
    best = read_checkpoint(tmp_path / "run" / "best.pt")
    assert best.kind == "best" and not best.resumable
    assert best.epoch == best.best_epoch <= 2


def test_same_seed_cpu_runs_are_bit_identical(synthetic_store: Path, tmp_path: Path) -> None:
    extra = {"train.epochs": 2, "train.deterministic": "true", "train.evaluate_test": "false"}
    for name in ("a", "b"):
        run_training(
            engine_settings(synthetic_store, tmp_path / "runs", **extra), out_dir=tmp_path / name
        )
    assert _same_weights(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")
    other = engine_settings(synthetic_store, tmp_path / "runs", **extra, **{"train.seed": 1})
    run_training(other, out_dir=tmp_path / "c")
    assert not _same_weights(tmp_path / "a" / "last.pt", tmp_path / "c" / "last.pt")


def test_mixup_and_cutmix_train_deterministically(synthetic_store: Path, tmp_path: Path) -> None:
    """Mixing runs inside the loop, on the device RNG the checkpoints save: same seed, same run."""
    extra = {
        "train.epochs": 2,
        "train.deterministic": "true",
        "train.evaluate_test": "false",
        "augment.enabled": "true",
        "augment.hflip": 0.0,
        "augment.mixup_alpha": 0.4,
        "augment.cutmix_alpha": 1.0,
    }
    results = [
        run_training(
            engine_settings(synthetic_store, tmp_path / "runs", **extra), out_dir=tmp_path / name
        )
        for name in ("a", "b")
    ]
    assert _same_weights(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")
    assert all(math.isfinite(row["train_loss"]) for row in results[0].history)
    plain = {**extra, "augment.mixup_alpha": 0.0, "augment.cutmix_alpha": 0.0}
    run_training(
        engine_settings(synthetic_store, tmp_path / "runs", **plain), out_dir=tmp_path / "c"
    )
    assert not _same_weights(tmp_path / "a" / "last.pt", tmp_path / "c" / "last.pt")


def test_bf16_autocast_on_cpu(synthetic_store: Path, tmp_path: Path) -> None:
    settings = engine_settings(
        synthetic_store,
        tmp_path / "runs",
        **{"train.precision": '"bf16"', "train.epochs": 2, "train.evaluate_test": "false"},
    )
    result = run_training(settings, out_dir=tmp_path / "run")
    assert result is not None
    assert all(math.isfinite(row["train_loss"]) for row in result.history)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    state = _weights(tmp_path / "run" / "last.pt")
    assert all(t.dtype in (torch.float32, torch.int64) for t in state.values())


def test_ema_accumulation_and_clipping_run(synthetic_store: Path, tmp_path: Path) -> None:
    settings = engine_settings(
        synthetic_store,
        tmp_path / "runs",
        **{
            "train.ema": "true",
            "train.ema_decay": 0.9,
            "train.accumulate": 2,
            "train.grad_clip": 0.5,
            "augment.enabled": "true",
            "augment.hflip": 0.0,
            "augment.erasing": 0.5,
            "train.epochs": 4,
            "train.evaluate_test": "false",
        },
    )
    result = run_training(settings, out_dir=tmp_path / "run")
    assert result is not None
    last = read_checkpoint(tmp_path / "run" / "last.pt")
    assert last.training is not None and last.training["ema_state"] is not None
    # model_state is the EMA (the weights to deploy); the raw trained weights differ from it.
    ema_weights = {k.removeprefix("module."): v for k, v in last.training["ema_state"].items()}
    raw = last.training["model_state"]
    assert all(torch.equal(last.model_state[k], ema_weights[k]) for k in last.model_state)
    assert any(not torch.equal(raw[k], ema_weights[k]) for k in raw if k in ema_weights)
    assert result.history[-1]["train_accuracy"] > 0.5


def test_resume_continues_the_ema_warmup(synthetic_store: Path, tmp_path: Path) -> None:
    """The warm-up count travels in last.pt: stopped after epoch 1 and resumed == straight."""
    extra = {
        "train.ema": "true",
        "train.ema_warmup": "true",
        "train.deterministic": "true",
        "train.evaluate_test": "false",
        "train.epochs": 3,
    }
    settings = engine_settings(synthetic_store, tmp_path / "runs", **extra)
    run_training(settings, out_dir=tmp_path / "straight")
    stop_after_one = RunHooks(on_epoch=lambda row: "stop" if row["epoch"] == 1 else None)
    run_training(settings, out_dir=tmp_path / "cut", hooks=stop_after_one)
    assert read_checkpoint(tmp_path / "cut" / "last.pt").epoch == 1
    run_training(settings, out_dir=tmp_path / "cut", resume="auto")
    assert _same_weights(tmp_path / "straight" / "last.pt", tmp_path / "cut" / "last.pt")
    training = read_checkpoint(tmp_path / "cut" / "last.pt").training
    assert training is not None and int(training["ema_state"]["n_averaged"]) > 1


def test_the_stop_line_says_what_a_checkpoint_interval_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With train.checkpoint_every = 10, a run stopped at epoch 8 has no last.pt: the line must
    not say it stopped before its first epoch, nor offer a resume that cannot work."""
    import types

    import ctscan.engine.run_folder as run_folder

    run = tmp_path / "run"
    run.mkdir()
    first = run_folder.run_stopped(run, Terminated()).message
    assert "before the first epoch ended" in first
    (run / "best.pt").write_bytes(b"x")
    stopped = run_folder.run_stopped(run, Terminated(), finished=8, every=10)
    assert "after 8 epochs, before its first last.pt (written every 10 epochs" in stopped.message
    assert "best.pt" in stopped.message and "first epoch" not in stopped.message
    assert "--resume" not in str(stopped.fix) and "checkpoint_every" in str(stopped.fix)
    (run / "last.pt").write_bytes(b"x")
    monkeypatch.setattr(run_folder, "read_checkpoint", lambda path: types.SimpleNamespace(epoch=10))
    later = run_folder.run_stopped(run, KeyboardInterrupt(), finished=13, every=10)
    assert "(epoch 10); epochs 11-13 since are lost" in later.message
    assert "--resume auto" in str(later.fix)


def test_early_stopping(synthetic_store: Path, tmp_path: Path) -> None:
    settings = engine_settings(
        synthetic_store,
        tmp_path / "runs",
        **{
            "train.epochs": 30,
            "train.early_stop_patience": 2,
            "train.lr": 1e-9,  # nothing improves after the first epoch
            "train.evaluate_test": "false",
        },
    )
    result = run_training(settings, out_dir=tmp_path / "run")
    assert result is not None and result.stopped_early
    assert len(result.history) == result.best_epoch + 2 < 30


def test_existing_run_folder_is_not_overwritten(synthetic_store: Path, tmp_path: Path) -> None:
    extra = {"train.epochs": 1, "train.evaluate_test": "false"}
    run_training(engine_settings(synthetic_store, tmp_path / "runs", **extra), out_dir=tmp_path)
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(CtscanError, match="already holds a checkpoint"):
        run_training(engine_settings(synthetic_store, tmp_path / "runs", **extra), out_dir=tmp_path)
    assert (tmp_path / "last.pt").read_bytes() == before


def test_resume_with_another_model_is_refused(synthetic_store: Path, tmp_path: Path) -> None:
    extra = {"train.epochs": 1, "train.evaluate_test": "false"}
    run_training(engine_settings(synthetic_store, tmp_path / "runs", **extra), out_dir=tmp_path)
    other = engine_settings(synthetic_store, tmp_path / "runs", **extra, **{"model.name": '"cnn"'})
    with pytest.raises(CheckpointError, match="holds a cnn_gap model"):
        run_training(other, out_dir=tmp_path, resume="auto")


def _train_args(store: Path, runs: Path, out: Path, *more: str) -> list[str]:
    overrides = engine_overrides(
        store,
        runs,
        **{"train.epochs": 4, "train.deterministic": "true", "train.evaluate_test": "false"},
    )
    return ["train", "--out", str(out), *(a for item in overrides for a in ("--set", item)), *more]


@pytest.fixture(scope="module")
def uninterrupted_run(synthetic_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The last.pt of `ctscan train` run to its end (4 epochs) in a process of its own."""
    root = tmp_path_factory.mktemp("uninterrupted")
    done = ctscan(*_train_args(synthetic_store, root / "runs", root / "run"))
    assert done.returncode == 0, done.stderr
    return root / "run" / "last.pt"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=str)
def test_interrupted_run_resumes_to_the_same_weights(
    synthetic_store: Path, uninterrupted_run: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    runs, cut = tmp_path / "runs", tmp_path / "cut"
    # the signal lands in epoch 2's validation: epoch 1's last.pt is written, epoch 2 is lost
    stopped = ctscan_stopped(_train_args(synthetic_store, runs, cut), sig, at=2)
    code, err = stopped.returncode, stopped.stderr
    stopped_at = read_checkpoint(cut / "last.pt").epoch
    assert stopped_at == 1, f"the run did not stop in epoch 2: {code} {err}"
    assert code != 0
    if sig != signal.SIGKILL:  # stopped cleanly: one line that says where to resume from
        assert code == (143 if sig == signal.SIGTERM else 130)
        assert "Traceback" not in err
        kind = "terminated" if sig == signal.SIGTERM else "interrupted"
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"ctscan: {kind}: training stopped by"), err
        assert str(cut / "last.pt") in line and f"--resume auto --out {cut}" in line
    resumed = ctscan_in_process(*_train_args(synthetic_store, runs, cut, "--resume", "auto"))
    assert f"resumed from {cut / 'last.pt'} at epoch {stopped_at + 1}" in resumed.stderr
    assert read_checkpoint(cut / "last.pt").epoch == 4
    assert _same_weights(uninterrupted_run, cut / "last.pt")


def _torchrun(overrides: list[str], out: Path) -> subprocess.CompletedProcess[str]:
    """torchrun --standalone: its rendezvous on a free local port (two suites at once, or
    another program on a fixed port, would fail with EADDRINUSE)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--standalone",
        "-m",
        "ctscan",
        "train",
        "--out",
        str(out),
    ]
    for item in overrides:
        cmd += ["--set", item]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_ddp_two_processes_with_gloo(synthetic_store: Path, tmp_path: Path) -> None:
    overrides = engine_overrides(
        synthetic_store, tmp_path / "runs", **{"train.epochs": 3, "train.evaluate_test": "false"}
    )
    proc = _torchrun(overrides, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Only rank 0 prints the summary and the epoch lines.
    assert proc.stdout.count('"best_checkpoint"') == 1
    assert proc.stderr.count("epoch   3/3") == 1
    last = read_checkpoint(tmp_path / "run" / "last.pt")
    assert last.training is not None
    assert last.epoch == 3 and len(last.training["rng"]) == 2
    assert last.history[-1]["train_images"] == 64  # both ranks' shards, 2 x 32
    assert last.history[-1]["train_accuracy"] > 0.5


@pytest.mark.slow
def test_ddp_with_a_frozen_then_unfrozen_backbone(synthetic_store: Path, tmp_path: Path) -> None:
    # The always-frozen stages are set aside before DDP is built: not in its gradient buckets.
    overrides = engine_overrides(synthetic_store, tmp_path / "runs", **_FROZEN_TWO)
    proc = _torchrun(overrides, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = read_checkpoint(tmp_path / "run" / "last.pt").history
    assert [row["epoch"] for row in history] == [1, 2]
    assert all(math.isfinite(row["train_loss"]) for row in history)
    _check_stages_0_1_untrained(tmp_path / "run" / "last.pt")


def test_quiet_progress_writes_each_line_in_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal between the text and its newline glued the stop message onto the epoch line."""
    from ctscan.engine.progress import Progress

    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return False

    monkeypatch.setattr(sys, "stderr", Recorder())
    with Progress(enabled=True, quiet=True, epochs=2, steps=3) as progress:
        progress.log("resumed from here")
        progress.epoch_line(
            {
                "epoch": 1,
                "train_loss": 0.5,
                "train_accuracy": 0.9,
                "val_loss": 0.1,
                "val_accuracy": 1.0,
                "val_macro_f1": 1.0,
                "lr": 1e-3,
                "train_images_per_s": 60.0,
                "epoch_seconds": 3.0,
            },
            best=True,
        )
    assert len(writes) == 2
    assert writes[0] == "resumed from here\n"
    assert writes[1].startswith("epoch   1/2") and writes[1].endswith(" *\n")
