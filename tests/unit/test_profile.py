"""`ctscan profile`: the files other tools read, the loop ranges in the trace, the split."""

from __future__ import annotations

import gzip
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from ctscan.cli import app
from ctscan.errors import CtscanError
from ctscan.ops.profile import LOOP_RANGES, run_profile
from tests.unit.conftest_store import engine_overrides, engine_settings

STEPS = 3  # + 1 wait + 1 warmup = 5 steps; the synthetic train split has 4 batches of 16
RANGES = ("forward", "backward", "optimizer_step", "augment", "data")
NO_CTSCAN_ENV = {k: None for k in os.environ if k.startswith("CTSCAN_")}


def _sets(store: Path, runs: Path, **extra: object) -> list[str]:
    """--set pairs for a fast CPU run, augmentation on (the augment range does real work)."""
    overrides = engine_overrides(store, runs, **{"augment.enabled": "true", **extra})
    return [arg for o in overrides for arg in ("--set", o)]


def _trace_events(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)["traceEvents"]


@dataclass
class Profiled:
    exit_code: int
    stdout: str
    stderr: str
    out_dir: Path

    @property
    def summary(self) -> dict[str, Any]:
        return json.loads((self.out_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def profiled(synthetic_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Profiled:
    """One `ctscan profile --steps 3 --out DIR` on the synthetic store, shared by the module."""
    tmp = tmp_path_factory.mktemp("profile")
    out = tmp / "out"
    args = ["profile", "--steps", str(STEPS), "--out", str(out), *_sets(synthetic_store, tmp)]
    result = CliRunner().invoke(app, args, env=NO_CTSCAN_ENV)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Profiled(result.exit_code, result.stdout, result.stderr, out)


def test_profile_leaves_the_trace_top_ops_and_summary(profiled: Profiled) -> None:
    assert profiled.exit_code == 0, profiled.stderr
    assert profiled.stdout.strip() == str(profiled.out_dir)  # stdout: the folder only
    out = profiled.out_dir
    assert [p.name for p in out.glob("*.json.gz")] == ["trace.json.gz"]
    top_ops = (out / "top_ops.txt").read_text()
    assert "Self CPU" in top_ops and "aten::convolution_backward" in top_ops
    assert "Self CUDA" not in top_ops.split("\n", 1)[1]  # the CUDA table is for CUDA runs
    tensorboard = list((out / "tensorboard").glob("*.pt.trace.json.gz"))
    assert len(tensorboard) == 1  # what torch-tb-profiler reads
    assert tensorboard[0].read_bytes() == (out / "trace.json.gz").read_bytes()
    summary = profiled.summary
    assert summary["model"] == "cnn_gap" and summary["device"] == "cpu"
    assert summary["steps_profiled"] == STEPS
    assert summary["memory"]["cpu_max_rss_mb"] > 0
    assert summary["memory"]["cpu_profiled_peak_allocated_mb"] > 0
    assert summary["memory"]["cuda_max_allocated_mb"] is None
    ops = summary["top_ops"]
    assert 0 < len(ops) <= 25
    assert [op["self_cpu_ms"] for op in ops] == sorted(
        (op["self_cpu_ms"] for op in ops), reverse=True
    )
    assert not {op["name"] for op in ops} & set(LOOP_RANGES)  # operators, not the loop's ranges
    assert "data + augment" in profiled.stderr and "aten::" in profiled.stderr


def test_trace_holds_each_loop_range_once_per_profiled_step(profiled: Profiled) -> None:
    events = _trace_events(profiled.out_dir / "trace.json.gz")
    names = [e.get("name", "") for e in events if e.get("ph") == "X"]
    steps = [n for n in names if n.startswith("ProfilerStep#")]
    assert len(steps) == STEPS == profiled.summary["steps_profiled"]
    for name in RANGES:  # wait and warmup steps are not recorded
        assert names.count(name) == STEPS, name
    allocated = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    peak_mb = profiled.summary["memory"]["cpu_profiled_peak_allocated_mb"]
    assert peak_mb == pytest.approx(max(allocated) / 2**20, abs=1e-3)


def test_split_is_the_ranges_share_of_the_step_time(profiled: Profiled) -> None:
    summary = profiled.summary
    split = summary["split"]
    assert 0 < split["data_augment"] < 1 and 0 < split["model"] < 1
    assert split["data_augment"] + split["model"] <= 1
    # the same figures, recomputed from the trace's events
    events = [e for e in _trace_events(profiled.out_dir / "trace.json.gz") if e.get("ph") == "X"]
    step_us = [e["dur"] for e in events if e["name"].startswith("ProfilerStep#")]

    def share(names: tuple[str, ...]) -> float:
        return sum(e["dur"] for e in events if e["name"] in names) / sum(step_us)

    assert split["data_augment"] == pytest.approx(share(("data", "augment")), abs=2e-3)
    assert split["model"] == pytest.approx(
        share(("forward", "backward", "optimizer_step")), abs=2e-3
    )
    assert summary["step_ms"]["median"] == pytest.approx(
        statistics.median(step_us) / 1000, rel=1e-3
    )


def test_a_short_split_repeats_the_epoch(profiled: Profiled) -> None:
    summary = profiled.summary
    assert summary["schedule"] == {"wait": 1, "warmup": 1, "active": STEPS}
    assert summary["epoch_passes"] == 2  # 5 steps from an epoch of 4 batches


def test_bad_out_is_one_line(
    synthetic_store: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Through the console-script entry point (`main`), which turns errors into one line."""
    from ctscan.cli import main

    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    for key in NO_CTSCAN_ENV:
        monkeypatch.delenv(key)
    args = ["profile", "--steps", "1", "--out", str(not_a_folder)]
    monkeypatch.setattr(sys, "argv", ["ctscan", *args, *_sets(synthetic_store, tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        main()
    captured = capsys.readouterr()
    assert exit_.value.code == 1, captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith("ctscan: error: profile folder")
    assert "is a file" in captured.err and "Fix:" in captured.err
    assert captured.out == ""
    assert not_a_folder.read_text() == "x"


def test_steps_below_one_are_refused(synthetic_store: Path, tmp_path: Path) -> None:
    settings = engine_settings(synthetic_store, tmp_path)
    with pytest.raises(CtscanError, match="--steps is 0"):
        run_profile(settings, steps=0, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_default_folder_is_in_runs_dir(synthetic_store: Path, tmp_path: Path) -> None:
    settings = engine_settings(synthetic_store, tmp_path / "runs")
    result = run_profile(settings, steps=1)
    assert result.out_dir.parent == tmp_path / "runs"
    assert result.out_dir.name.startswith("profile-cnn_gap-")
    assert result.summary["steps_profiled"] == 1 and result.summary["epoch_passes"] == 1
    assert json.loads((result.out_dir / "summary.json").read_text()) == result.summary


def test_help_shows_the_defaults() -> None:
    result = CliRunner().invoke(app, ["profile", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    text = " ".join(result.output.replace("│", " ").split())
    assert "[default: 5]" in text
    assert "(default: paths.runs_dir/profile-<model>-<time>)" in text


@pytest.mark.slow
def test_profile_is_tracked_in_mlflow(synthetic_store: Path, mlflow_runs_dir: Path) -> None:
    from mlflow import MlflowClient

    settings = engine_settings(synthetic_store, mlflow_runs_dir, **{"tracking.enabled": "true"})
    result = run_profile(settings, steps=2, out_dir=mlflow_runs_dir / "profile")
    run_id = result.summary["mlflow_run_id"]
    assert run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_runs_dir / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["kind"] == "profile" and run.data.tags["model"] == "cnn_gap"
    metrics = run.data.metrics
    assert metrics["step_ms_median"] == pytest.approx(result.summary["step_ms"]["median"])
    assert metrics["data_augment_fraction"] == pytest.approx(
        result.summary["split"]["data_augment"]
    )
    assert metrics["steps_profiled"] == 2
    assert run.data.params["model.name"] == "cnn_gap"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"summary.json", "top_ops.txt", "trace.json.gz", "settings.toml", "tensorboard"} <= (
        artifacts
    )
    traces = [a.path for a in client.list_artifacts(run_id, "tensorboard")]
    assert len(traces) == 1 and traces[0].endswith(".pt.trace.json.gz")


TB_LOAD = """
import sys
import torch_tb_profiler  # noqa: F401  (the package first: its modules import each other)
from torch_tb_profiler import io
from torch_tb_profiler.profiler import RunLoader

if __name__ == "__main__":
    run = RunLoader("tensorboard", sys.argv[1], io.Cache()).load()
    worker = run.workers[0]
    spans = run.get_spans(worker)
    profile = run.get_profile(worker, spans[0] if spans else None)
    print(len(profile.overview["steps"]["rows"]), *[v.display_name for v in profile.views])
"""


@pytest.mark.slow
def test_torch_tb_profiler_reads_the_tensorboard_folder(profiled: Profiled, tmp_path: Path) -> None:
    pytest.importorskip("torch_tb_profiler")
    script = tmp_path / "tb_load.py"  # its loader spawns processes: a real script file
    script.write_text(TB_LOAD)
    proc = subprocess.run(
        [sys.executable, str(script), str(profiled.out_dir / "tensorboard")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    steps, *views = proc.stdout.split()
    assert int(steps) == STEPS
    assert {"Overview", "Operator", "Trace", "Memory"} <= set(views)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_profile_records_kernels_and_cuda_memory(
    synthetic_store: Path, tmp_path: Path
) -> None:
    settings = engine_settings(
        synthetic_store, tmp_path, **{"train.device": '"cuda"', "train.compile": '"off"'}
    )
    result = run_profile(settings, steps=2, out_dir=tmp_path / "out")
    summary = result.summary
    assert summary["schedule"]["warmup"] == 2 and summary["steps_profiled"] == 2
    assert summary["memory"]["cuda_max_allocated_mb"] > 0
    assert any(op["self_cuda_ms"] > 0 for op in summary["top_ops"])
    assert "Self CUDA" in (result.out_dir / "top_ops.txt").read_text()
    events = _trace_events(result.out_dir / "trace.json.gz")
    assert any(e.get("cat") == "kernel" for e in events)
    split = summary["split"]
    assert 0 <= split["data_augment"] <= 1 and split["data_augment"] + split["model"] <= 1
