"""`ctscan sweep`: spec checks, the study, nested MLflow runs, pruning, resume, worker processes.

Real Optuna, a real MLflow SQLite store and the real training loop on the synthetic store; the
slow tests train (a few short trials each).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ctscan.ops.sweep as sweep_module
from ctscan.errors import CtscanError, Interrupted, SettingsError
from ctscan.ops.sweep import (
    SweepError,
    find_spec,
    open_study,
    parse_spec,
    prepare,
    run_sweep,
)
from ctscan.settings import load_settings, to_toml, toml_value
from tests.unit.conftest_store import engine_overrides, write_synthetic_store

ROOT = Path(__file__).resolve().parents[2]
SMOKE_SPEC = ROOT / "settings" / "sweeps" / "cpu-smoke.toml"
needs_optuna = pytest.mark.skipif(
    importlib.util.find_spec("optuna") is None, reason="optuna (the sweep extra) is not installed"
)
GOOD: dict[str, Any] = {
    "sweep": {"metric": "val_macro_f1"},
    "params": {"train": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}},
}


def write_base(folder: Path, store: Path, runs: Path, **extra: object) -> Path:
    """A base settings file for fast CPU trials on the synthetic store (TOML dotted keys)."""
    path = folder / "base.toml"
    path.write_text("\n".join(engine_overrides(store, runs, **extra)) + "\n")
    return path


def write_spec(
    folder: Path,
    base: Path,
    *,
    name: str = "study",
    sweep: dict[str, Any] | None = None,
    fixed: dict[str, Any] | None = None,
    params: dict[str, dict[str, Any]] | None = None,
) -> Path:
    sweep = {"metric": "val_macro_f1", "settings": [str(base)], "trials": 3, **(sweep or {})}
    if params is None:
        params = {"train.lr": {"low": 1e-3, "high": 1e-2, "log": True}}
    lines = ["[sweep]", *(f"{k} = {toml_value(v)}" for k, v in sweep.items())]
    lines += ["[fixed]", *(f'"{k}" = {toml_value(v)}' for k, v in (fixed or {}).items())]
    for key, table in params.items():
        lines += [f'[params."{key}"]', *(f"{k} = {toml_value(v)}" for k, v in table.items())]
    path = folder / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def mlflow_client(runs: Path) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")


def load_study(runs: Path, name: str = "study") -> Any:
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{runs / 'optuna.db'}")


def no_test_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any read of the test split (arrays, split, evaluation) fails the test."""
    from ctscan.data.store import Store

    split, load_array = Store.split, Store._load_array

    def guarded_split(self: Store, name: str) -> Any:
        assert name != "test", "the sweep read the test split"
        return split(self, name)

    def guarded_load(self: Store, fname: str) -> Any:
        assert not fname.startswith("test_"), f"the sweep loaded {fname}"
        return load_array(self, fname)

    def no_evaluation(*args: object, **kwargs: object) -> None:
        raise AssertionError("the sweep evaluated a checkpoint on test")

    monkeypatch.setattr(Store, "split", guarded_split)
    monkeypatch.setattr(Store, "_load_array", guarded_load)
    monkeypatch.setattr("ctscan.engine.train.evaluate_checkpoint", no_evaluation)


# ---- the spec -----------------------------------------------------------------------------


def test_both_toml_spellings_of_a_key_give_the_same_spec() -> None:
    dotted = tomllib.loads(
        '[sweep]\nmetric = "val_loss"\n[fixed]\n"train.epochs" = 2\n'
        '[params."train.lr"]\nlow = 1e-4\nhigh = 1e-2\nlog = true\n'
        '[params."train.batch_size"]\nchoices = [16, 32]\n'
    )
    nested = tomllib.loads(
        '[sweep]\nmetric = "val_loss"\n[fixed.train]\nepochs = 2\n'
        "[params.train.lr]\nlow = 1e-4\nhigh = 1e-2\nlog = true\n"
        "[params.train.batch_size]\nchoices = [16, 32]\n"
    )
    a, b = parse_spec(dotted, Path("a.toml")), parse_spec(nested, Path("b.toml"))
    assert a.search_identity() == b.search_identity()
    assert a.direction == "minimize" and a.sampler == "tpe" and a.pruning
    assert a.fixed == {"train.epochs": 2}
    lr, batch = a.params
    assert (lr.key, lr.low, lr.high, lr.log, lr.integer) == ("train.lr", 1e-4, 1e-2, True, False)
    assert batch.choices == (16, 32)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"params": {"train.lrr": {"low": 0.1, "high": 0.2}}},
            r"unknown settings key 'train\.lrr' in \[params\]\. Did you mean: train\.lr",
        ),
        ({"params": {"train.lr": {"low": 0.1, "high": 0.01}}}, r"low 0\.1 must be below high"),
        (
            {"params": {"train.lr": {"low": 0.0, "high": 0.1, "log": True}}},
            "log range needs low > 0",
        ),
        ({"sweep": {"metric": "val_acc"}}, r"metric 'val_acc'\. Did you mean: val_accuracy"),
        ({"sweep": {"metric": "test_accuracy"}}, r"validation metric .*val_macro_f1"),
        ({"sweep": {}}, r"no metric"),
        (
            {"sweep": {"metric": "val_macro_f1", "sampler": "grid"}},
            "sampler 'grid' is not one of tpe, random",
        ),
        ({"sweep": {"metric": "val_loss", "direction": "maximize"}}, "the worst models"),
        ({"sweep": {"metric": "val_macro_f1", "direction": "up"}}, "direction 'up' is not one"),
        (
            {"sweep": {"metric": "val_macro_f1", "sampeler": "tpe"}},
            r"unknown key 'sampeler' in \[sweep\]\. Did you mean: sampler",
        ),
        ({"sweep": {"metric": "val_macro_f1", "trials": 0}}, "trials = 0 is too small"),
        ({"sweep": {"metric": "val_macro_f1", "seed": "1"}}, "seed = '1' is not a int"),
        ({"params": {}}, "nothing to search"),
        ({"params": {"train.epochs": {"low": 1.5, "high": 4}}}, "must be integers"),
        ({"params": {"model.name": {"low": 1, "high": 2}}}, "not a number setting"),
        (
            {"params": {"train.lr": {"low": 1e-3, "high": 1e-2, "choices": [1e-3]}}},
            "both choices and low, high",
        ),
        ({"params": {"train.lr": {"choices": []}}}, "non-empty list"),
        ({"params": {"train.lr": {"choices": [0.1, 0.1]}}}, "distinct"),
        ({"params": {"train.lr": {"high": 0.1}}}, "needs low and high"),
        (
            {"params": {"train.lr": {"lo": 1e-3, "high": 1.0}}},
            r"unknown key 'lo'.*Did you mean: low",
        ),
        ({"params": {"train.lr": 0.1}}, "is not a table"),
        (
            {"params": {"train.lr": {"low": 1e-3, "high": 1e-2, "log": True, "step": 1e-3}}},
            "cannot go with log",
        ),
        ({"params": {"paths.runs_dir": {"choices": ["a", "b"]}}}, r"move 'paths\.runs_dir' to"),
        ({"params": {"train.evaluate_test": {"choices": [True]}}}, "sets for every trial"),
        ({**GOOD, "fixed": {"train": {"select_metric": "val_loss"}}}, "sets for every trial"),
        ({**GOOD, "fixed": {"train.lr": 0.1}}, r"both in \[fixed\] and in \[params\]"),
        ({**GOOD, "fixed": {"train.epoch": 2}}, r"Did you mean: train\.epochs"),
        ({**GOOD, "sweeps": {}}, r"unknown key 'sweeps' in \[top level\]\. Did you mean: sweep"),
    ],
)
def test_spec_mistakes_are_one_line_settings_errors(change: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as err:
        parse_spec({**GOOD, **change}, Path("spec.toml"))
    assert str(err.value).startswith("sweep spec 'spec.toml': ")
    assert "\n" not in str(err.value) and err.value.fix


@given(low=st.floats(1e-6, 10.0), factor=st.floats(1.001, 1e4), log=st.booleans())
def test_any_float_range_with_low_below_high_is_a_float_param(
    low: float, factor: float, log: bool
) -> None:
    spec = parse_spec(
        {
            "sweep": {"metric": "val_loss"},
            "params": {"train.lr": {"low": low, "high": low * factor, "log": log}},
        },
        Path("s.toml"),
    )
    (param,) = spec.params
    assert (param.low, param.high, param.log, param.integer) == (low, low * factor, log, False)
    assert json.loads(json.dumps(spec.search_identity())) == spec.search_identity()


@given(low=st.integers(-3, 40), high=st.integers(-3, 40), as_float_field=st.booleans())
def test_int_bounds_give_an_int_param_for_int_settings_only(
    low: int, high: int, as_float_field: bool
) -> None:
    key = "train.warmup_epochs" if as_float_field else "train.epochs"
    data = {"sweep": {"metric": "val_macro_f1"}, "params": {key: {"low": low, "high": high}}}
    if low >= high:
        with pytest.raises(SettingsError, match="must be below high"):
            parse_spec(data, Path("s.toml"))
        return
    (param,) = parse_spec(data, Path("s.toml")).params
    assert param.integer is not as_float_field
    assert type(param.low) is (float if as_float_field else int)


def test_prepare_checks_files_and_every_bound_against_the_settings(tmp_path: Path) -> None:
    base = write_base(tmp_path, tmp_path / "store", tmp_path / "runs")
    with pytest.raises(SettingsError, match=r"sweep spec 'nope\.toml' does not exist"):
        prepare("nope.toml")
    spec = write_spec(tmp_path, tmp_path / "missing.toml")
    with pytest.raises(SettingsError, match=r"\[sweep\] settings: settings file .* does not exist"):
        prepare(spec)
    spec = write_spec(tmp_path, base, params={"model.dropout": {"low": 0.1, "high": 1.5}})
    with pytest.raises(
        SettingsError, match=r"'model\.dropout' = 1\.5: Input should be less than 1"
    ):
        prepare(spec)
    spec = write_spec(tmp_path, base, params={"train.batch_size": {"choices": [16, 0]}})
    with pytest.raises(
        SettingsError, match=r"'train\.batch_size' = 0.*\[params\.\"train\.batch_size"
    ):
        prepare(spec)
    spec = write_spec(tmp_path, base, fixed={"augment.hflip": True})  # the spec, not a --set
    with pytest.raises(
        SettingsError, match=r'not the boolean true \(from \[fixed\] "augment\.hflip" of'
    ):
        prepare(spec)
    spec = write_spec(tmp_path, base, sweep={"trials": 1, "settings": [str(base)]})
    spec.write_text(spec.read_text().replace("trials = 1\n", ""))
    with pytest.raises(SettingsError, match="no number of trials"):
        prepare(spec)
    ready = prepare(spec, trials=4, jobs=2, name="lr-search")
    assert ready.db == tmp_path / "runs" / "optuna.db"
    assert ready.folder == tmp_path / "runs" / "sweeps" / "lr-search"
    assert ready.command == f"ctscan sweep {spec} --trials 4 --jobs 2 --name lr-search"
    forced = ready.forced()
    assert forced["train.evaluate_test"] is False and forced["tracking.log_model"] is False
    assert forced["train.threads"] >= 1 and forced["train.quiet"] is True
    trial = ready.trial_settings({"train.lr": 0.005})
    assert trial.train.lr == 0.005 and trial.train.evaluate_test is False
    # a drawn value the settings refuse names the spec, not --set
    with pytest.raises(SettingsError) as err:
        ready.trial_settings({"train.lr": -1.0})
    assert '(from [params."train.lr"] of the spec)' in err.value.message
    assert "--set" not in err.value.message
    with pytest.raises(SettingsError, match="not a plain name"):
        prepare(spec, trials=1, name="../up")


def test_prepare_checks_keys_that_depend_on_each_other_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bound is checked against the values the spec draws for the keys it depends on, not
    against the base value of those keys (base scale_min 0.9 > 0.85, yet every trial is valid)."""
    base = write_base(tmp_path, tmp_path / "store", tmp_path / "runs")
    assert load_settings([base], []).augment.scale_min == 0.9
    scales = {
        "augment.scale_min": {"low": 0.7, "high": 0.8},
        "augment.scale_max": {"low": 0.85, "high": 1.2},
    }
    sweep = prepare(write_spec(tmp_path, base, params=scales))
    assert sweep.trial_settings({"augment.scale_min": 0.8, "augment.scale_max": 0.85})
    # A value no drawn partner fits is refused, naming the spec's keys, not the base value.
    scales["augment.scale_min"]["high"] = 1.3
    with pytest.raises(SettingsError) as err:
        prepare(write_spec(tmp_path, base, params=scales))
    message = err.value.message
    assert "no trial can use augment.scale_min = 1.3" in message
    assert "augment.scale_max" in message and '[params."augment.scale_max"] of the spec' in message
    assert "default" not in message and str(base) not in message.split(":", 1)[1]
    # Some trials may draw a refused pair (min 1.0 > max 0.95): the spec starts, they fail alone.
    overlap = {
        "augment.scale_min": {"low": 0.8, "high": 1.0},
        "augment.scale_max": {"low": 0.95, "high": 1.2},
    }
    sweep = prepare(write_spec(tmp_path, base, params=overlap))
    with pytest.raises(SettingsError, match=r"scale_min"):
        sweep.trial_settings({"augment.scale_min": 1.0, "augment.scale_max": 0.95})
    # A value wrong by itself is named alone, whatever its partners (even one that is wrong too).
    overlap["augment.scale_min"]["low"] = -0.5
    overlap["augment.scale_max"]["low"] = -1.0
    with pytest.raises(SettingsError) as err:
        prepare(write_spec(tmp_path, base, params=overlap))
    assert "'augment.scale_min' = -0.5" in err.value.message
    assert "no trial can use" not in err.value.message
    names = {
        "model.name": {"choices": ["resnet18", "nope"]},
        "model.frozen_stages": {"low": 0, "high": 5},
    }
    with pytest.raises(SettingsError, match=r"'model\.name' = 'nope'") as err:
        prepare(write_spec(tmp_path, base, params=names, fixed={"model.pretrained": True}))
    assert "frozen_stages" not in err.value.message
    # A stepped range is checked at what Optuna draws: 0, 2, 4 (resnet18 has 4 stages), not 5.
    stepped = {"model.frozen_stages": {"low": 0, "high": 5, "step": 2}}
    fixed = {"model.name": "resnet18", "model.pretrained": True}
    prepare(write_spec(tmp_path, base, params=stepped, fixed=fixed))
    # Keys the check does not tie together do not multiply the work: 4^6 x 2 x 2 combinations
    # of augment keys, one pair of which matters, are checked in a few loads.
    many = {k: {"choices": [0.0, 0.1, 0.2, 0.3]} for k in ("hflip", "vflip", "brightness")}
    many |= {k: {"choices": [0.0, 0.1, 0.2, 0.3]} for k in ("contrast", "erasing", "translate")}
    wide = {
        "augment.scale_max": {"low": 0.5, "high": 1.2},
        **{f"augment.{k}": v for k, v in many.items()},
        "augment.scale_min": {"low": 0.4, "high": 1.0},
    }
    loads = []
    real = sweep_module.load_settings
    monkeypatch.setattr(
        sweep_module, "load_settings", lambda *a, **k: loads.append(1) or real(*a, **k)
    )
    prepare(write_spec(tmp_path, base, params=wide))
    assert len(loads) < 60


def test_a_spec_is_found_by_name_in_settings_sweeps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert find_spec("cpu-smoke") == Path("settings/sweeps/cpu-smoke.toml")
    with pytest.raises(SettingsError, match=r"Specs in settings/sweeps/: .*cpu-smoke"):
        find_spec("cpu-smok")
    smoke = prepare("cpu-smoke")
    assert smoke.name == "cpu-smoke" and smoke.n_trials == 4
    assert [p.resolve() for p in smoke.files] == [ROOT / "settings" / "cpu-smoke.toml"]
    assert smoke.settings.model.name == "cnn_gap" and smoke.settings.tracking.enabled


def test_cli_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTSCAN_", "MLFLOW_"))}
    base = write_base(tmp_path, tmp_path / "store", tmp_path / "runs")
    bad_key = write_spec(tmp_path, base, params={"train.lrr": {"low": 0.1, "high": 0.2}})
    for args, code, expected in [
        (["missing.toml"], 2, "sweep spec 'missing.toml' does not exist"),
        ([str(bad_key)], 2, "unknown settings key 'train.lrr' in [params]. Did you mean: train.lr"),
        ([str(bad_key), "--jobs", "0"], 2, "Invalid value for '--jobs'"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "ctscan", "sweep", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        assert proc.returncode == code, proc.stderr
        assert expected in proc.stderr and "Traceback" not in proc.stderr
        if code == 2 and "Invalid value" not in expected:
            assert proc.stderr.startswith("ctscan: error: ") and proc.stderr.count("\n") == 1


# ---- the study ----------------------------------------------------------------------------


def test_a_missing_optuna_is_one_line_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = write_spec(tmp_path, write_base(tmp_path, tmp_path / "store", tmp_path / "runs"))
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(SweepError, match="needs optuna") as err:
        run_sweep(spec)
    assert err.value.fix == "pip install 'ctscan[sweep]'"


@needs_optuna
def test_a_study_refuses_trials_that_would_train_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not in the spec nor the base files, yet deciding a trial: ctscan's defaults (a key added
    since, train.ema_warmup) and CTSCAN_* variables. A new trial must train as the earlier ones."""
    import shlex

    import optuna

    from ctscan.ops.sweep import ATTR_RUN_DIR, ATTR_SETTINGS

    for var in [v for v in os.environ if v.upper().startswith("CTSCAN_")]:
        monkeypatch.delenv(var)
    base = write_base(tmp_path, tmp_path / "store", tmp_path / "runs", **{"train.ema": "true"})
    spec = write_spec(tmp_path, base)
    study = open_study(optuna, prepare(spec), create=True)
    assert study.user_attrs[ATTR_SETTINGS]["train"]["ema_warmup"] is True
    monkeypatch.setenv("CTSCAN_TRAIN__WEIGHT_DECAY", "0.05")
    with pytest.raises(SweepError, match=r"train\.weight_decay 0\.01 -> 0\.05") as err:
        open_study(optuna, prepare(spec), create=True)
    assert "CTSCAN_TRAIN__WEIGHT_DECAY=0.01" in str(err.value.fix)
    monkeypatch.delenv("CTSCAN_TRAIN__WEIGHT_DECAY")
    monkeypatch.setenv("CTSCAN_TRACKING__EXPERIMENT", "elsewhere")  # where, not how: allowed
    open_study(optuna, prepare(spec), create=True)
    # A study made before ctscan recorded its settings: its first trial's settings.toml decides,
    # and it predates train.ema_warmup (its trials averaged without the warm-up).
    trial = study.ask()
    run_dir = tmp_path / "runs" / "sweeps" / "study" / "trial-0000"
    run_dir.mkdir(parents=True)
    old = load_settings([base], [])
    text = "\n".join(
        line for line in to_toml(old).splitlines() if not line.startswith("ema_warmup")
    )
    (run_dir / "settings.toml").write_text(text + "\n")
    trial.set_user_attr(ATTR_RUN_DIR, str(run_dir))
    study.tell(trial, 0.5)
    study.set_user_attr(ATTR_SETTINGS, None)
    with pytest.raises(SweepError, match=r"train\.ema_warmup False -> True") as err:
        open_study(optuna, prepare(spec), create=True)
    (assignment,) = shlex.split(str(err.value.fix).split("(", 1)[1].split(" before")[0])
    assert assignment == "CTSCAN_TRAIN__EMA_WARMUP=false"
    monkeypatch.setenv(*assignment.split("="))
    open_study(optuna, prepare(spec), create=True)


@needs_optuna
def test_a_changed_spec_is_refused_with_the_fix(tmp_path: Path) -> None:
    import optuna

    base = write_base(tmp_path, tmp_path / "store", tmp_path / "runs")
    spec = write_spec(tmp_path, base)
    study = open_study(optuna, prepare(spec), create=True)
    assert open_study(optuna, prepare(spec), create=False).user_attrs == study.user_attrs
    write_spec(tmp_path, base, params={"train.lr": {"low": 1e-3, "high": 1e-1, "log": True}})
    with pytest.raises(SweepError, match=r"another spec \(params\.train\.lr\.high: 0\.01 -> 0\.1"):
        open_study(optuna, prepare(spec), create=True)
    write_spec(tmp_path, base)  # the spec back, but a base setting changed
    base.write_text(base.read_text().replace("train.batch_size=16", "train.batch_size=8"))
    with pytest.raises(SweepError, match=r"base\.train\.batch_size: 16 -> 8") as err:
        open_study(optuna, prepare(spec), create=True)
    assert "--name study-2" in err.value.fix and "optuna delete-study" in err.value.fix
    assert "\n" not in str(err.value)
    assert open_study(optuna, prepare(spec, name="study-2"), create=True).trials == []


@needs_optuna
@pytest.mark.parametrize("when", ["before training", "after training"])
def test_a_sigterm_during_a_trials_bookkeeping_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """CI: a SIGTERM that landed after the training, while the result was being recorded, left
    the trial RUNNING with half its attributes. A stop in the bookkeeping now waits for it."""
    import optuna

    from ctscan.engine.train import TrainResult
    from ctscan.errors import Terminated, raise_terminated
    from ctscan.ops.sweep import ATTR_EPOCHS, ATTR_INTERRUPTED, ATTR_WORKER, run_trial

    base = write_base(tmp_path, tmp_path / "store", tmp_path / "runs")
    sweep = prepare(write_spec(tmp_path, base))
    study = open_study(optuna, sweep, create=True)
    trained: list[Path] = []

    def fake_training(settings: object, *, out_dir: Path, hooks: object) -> TrainResult:
        trained.append(out_dir)
        row = {"epoch": 1, "val_macro_f1": 0.5, "val_loss": 1.0}
        return TrainResult(
            run_dir=out_dir,
            best_path=out_dir / "best.pt",
            last_path=out_dir / "last.pt",
            best_epoch=1,
            best_value=0.5,
            select_metric="val_macro_f1",
            history=[row],
        )

    monkeypatch.setattr("ctscan.engine.train.run_training", fake_training)
    set_attr = optuna.Trial.set_user_attr
    sent = {ATTR_WORKER if when == "before training" else ATTR_EPOCHS: False}

    def stopped_midway(trial: Any, key: str, value: Any) -> None:
        set_attr(trial, key, value)
        if key in sent and not sent[key]:
            sent[key] = True
            os.kill(os.getpid(), signal.SIGTERM)  # the sweep stopping its workers
            time.sleep(0.05)  # Python code keeps running: the handler would fire here

    monkeypatch.setattr(optuna.Trial, "set_user_attr", stopped_midway)
    previous = signal.signal(signal.SIGTERM, raise_terminated)  # as a worker has it
    try:
        with pytest.raises(Terminated):
            run_trial(optuna, sweep, study, study.ask(), None, worker=1)
    finally:
        signal.signal(signal.SIGTERM, previous)
    (trial,) = study.get_trials(deepcopy=False)
    if when == "before training":  # stopped before it trained: runs again on the next sweep
        assert trained == [] and trial.state.name == "FAIL"
        assert trial.user_attrs[ATTR_INTERRUPTED] is True and trial.params
    else:  # trained: its result stands
        assert trial.state.name == "COMPLETE" and trial.value == 0.5
        assert ATTR_INTERRUPTED not in trial.user_attrs


@needs_optuna
def test_the_database_is_never_seen_half_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that opened optuna.db between table creation and the version stamp failed
    with 'UNIQUE constraint failed: alembic_version' (CI): every open must find it finished."""
    import sqlite3

    import optuna

    spec = write_spec(tmp_path, write_base(tmp_path, tmp_path / "store", tmp_path / "runs"))
    sweep = prepare(spec)
    real = optuna.storages.RDBStorage
    seen: list[bool] = []

    class Checked(real):  # type: ignore[misc, valid-type]
        def __init__(self, url: str, *args: object, **kwargs: object) -> None:
            if url == sweep.storage_url:  # the database readers share: stamped before any open
                with sqlite3.connect(sweep.db) as db:
                    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
                    stamped = "alembic_version" in tables and bool(
                        db.execute("SELECT * FROM alembic_version").fetchall()
                    )
                seen.append(stamped)
            super().__init__(url, *args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", Checked)
    open_study(optuna, sweep, create=True)
    open_study(optuna, sweep, create=False)
    assert seen == [True, True]
    assert sorted(p.name for p in sweep.db.parent.iterdir() if "optuna" in p.name) == [
        "optuna.db",
        "optuna.db.lock",
    ]


@needs_optuna
def test_studies_created_at_the_same_time_share_the_database(tmp_path: Path) -> None:
    import optuna

    base = write_base(tmp_path, tmp_path / "store", tmp_path / "runs")
    spec = write_spec(tmp_path, base)
    errors: list[BaseException] = []
    names = ["a", "b", "c", "a", "b", "c"]
    barrier = threading.Barrier(len(names))

    def create(name: str) -> None:
        try:
            barrier.wait()
            open_study(optuna, prepare(spec, name=name), create=True)
        except BaseException as exc:  # collected: the test fails below
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    studies = optuna.get_all_study_names(f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}")
    assert sorted(studies) == ["a", "b", "c"]


@needs_optuna
def test_one_sweep_per_study_at_a_time(tmp_path: Path) -> None:
    from ctscan.files import folder_lock

    base = write_base(tmp_path, tmp_path / "store", tmp_path / "runs")
    spec = write_spec(tmp_path, base)
    folder = tmp_path / "runs" / "sweeps" / "study"
    folder.mkdir(parents=True)
    with (
        folder_lock(folder, what="sweep folder"),
        pytest.raises(SweepError, match="being run by another `ctscan sweep`") as err,
    ):
        run_sweep(spec)
    assert "--name" in err.value.fix


def test_render_sweep_marks_the_best_trial() -> None:
    from rich.console import Console

    from ctscan.render import render_sweep

    row = {"params": {"train.lr": 0.00312}, "epochs": 3, "seconds": 1.5, "note": ""}
    summary = {
        "study": "s",
        "metric": "val_macro_f1",
        "direction": "maximize",
        "param_keys": ["train.lr"],
        "counts": {"complete": 1, "pruned": 1},
        "trials_wanted": 2,
        "optuna_storage": "runs/optuna.db",
        "sweep_folder": "runs/sweeps/s",
        "best": {"number": 0},
        "trials": [
            {**row, "number": 0, "state": "COMPLETE", "value": 0.91},
            {**row, "number": 1, "state": "PRUNED", "value": 0.2, "note": "pruned at epoch 1"},
        ],
    }
    console = Console(record=True, width=160)
    console.print(render_sweep(summary))
    text = console.export_text()
    assert "0 *" in text and "0.9100" in text and "0.00312" in text and "pruned at epoch 1" in text
    assert "1 complete, 1 pruned" in text


# ---- trials: the loop, MLflow, pruning, resume, workers ----------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return write_synthetic_store(tmp_path / "store", train=8, valid=4, test=4)


@needs_optuna
@pytest.mark.slow
def test_trials_are_nested_runs_and_the_best_is_a_recipe(
    store: Path, mlflow_runs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_test_split(monkeypatch)
    base = write_base(tmp_path, store, mlflow_runs_dir, **{"tracking.enabled": "true"})
    spec = write_spec(
        tmp_path,
        base,
        sweep={"sampler": "random", "pruning": False},
        fixed={"train.epochs": 2},
        params={
            "train.lr": {"low": 1e-3, "high": 1e-2, "log": True},
            "train.batch_size": {"choices": [8, 16]},
        },
    )
    lines: list[str] = []
    result = run_sweep(spec, say=lines.append)
    summary = result.summary()
    assert summary["counts"] == {"complete": 3} and result.error is None
    assert [line.split(":")[0] for line in lines[1:]] == [f"trial {n} complete" for n in range(3)]
    # Optuna: the study beside the MLflow store, each trial its own run folder.
    study = load_study(mlflow_runs_dir)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    run_dirs = [Path(row["run_dir"]) for row in summary["trials"]]
    assert len(set(run_dirs)) == 3 and all((d / "best.pt").is_file() for d in run_dirs)
    assert all(d.parent == mlflow_runs_dir / "sweeps" / "study" for d in run_dirs)
    # MLflow: one parent run, the trials nested under it with params and per-epoch metrics.
    client = mlflow_client(mlflow_runs_dir)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep-study"
    assert parent.data.tags["kind"] == "sweep"
    assert parent.data.params["space.train.lr"] == "float [0.001, 0.01] log"
    assert parent.data.metrics["best_val_macro_f1"] == pytest.approx(result.best["value"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {
        "best.toml",
        "sweep.json",
    }
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_trial = {int(run.data.tags["ctscan.trial"]): run for run in children}
    assert sorted(by_trial) == [0, 1, 2]
    for row in summary["trials"]:
        run = by_trial[row["number"]]
        assert run.info.run_id == row["mlflow_run_id"] and run.info.status == "FINISHED"
        assert float(run.data.params["train.lr"]) == pytest.approx(row["params"]["train.lr"])
        assert run.data.params["train.batch_size"] == str(row["params"]["train.batch_size"])
        assert run.data.params["train.evaluate_test"] == "False"
        history = client.get_metric_history(run.info.run_id, "val_macro_f1")
        assert [m.step for m in history] == [1, 2]
        assert row["value"] == pytest.approx(max(m.value for m in history))
        assert "test_accuracy" not in run.data.metrics
    assert client.search_registered_models() == []  # trials never enter the registry
    # The recipe: base + fixed + the best parameters, loadable with -s.
    assert result.recipe == mlflow_runs_dir / "sweeps" / "study" / "best.toml"
    recipe = load_settings([result.recipe])
    best = result.best
    assert best == max(summary["trials"], key=lambda r: r["value"])
    assert recipe.train.lr == best["params"]["train.lr"]
    assert recipe.train.batch_size == best["params"]["train.batch_size"]
    assert recipe.train.epochs == 2 and recipe.model.name == "cnn_gap"
    assert recipe.paths.processed_dir == store and recipe.train.select_metric == "val_macro_f1"
    assert recipe.train.evaluate_test is True  # the sweep's own overrides stay out of it


@needs_optuna
@pytest.mark.slow
def test_trials_worse_than_the_median_are_pruned_and_recorded(
    store: Path, mlflow_runs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def scripted_validate(model: Any, loop: Any, images: Any, labels: Any) -> dict[str, float]:
        score = loop.settings.train.lr * 50  # a higher lr scores higher, every epoch
        return {"val_loss": 1 - score, "val_accuracy": score, "val_macro_f1": score}

    monkeypatch.setattr("ctscan.engine.train.validate", scripted_validate)
    base = write_base(tmp_path, store, mlflow_runs_dir, **{"tracking.enabled": "true"})
    spec = write_spec(
        tmp_path,
        base,
        sweep={"sampler": "random", "seed": 3, "trials": 6, "pruning_startup_trials": 1},
        fixed={"train.epochs": 3},
    )
    result = run_sweep(spec, say=lambda line: None)
    rows = result.summary()["trials"]
    complete: list[float] = []
    for row in rows:  # the median rule, replayed: pruned at epoch 1 iff below the median
        score = row["params"]["train.lr"] * 50
        below = bool(complete) and score < statistics.median(complete)
        assert row["state"] == ("PRUNED" if below else "COMPLETE"), rows
        if not below:
            complete.append(score)
    pruned = [row for row in rows if row["state"] == "PRUNED"]
    assert pruned, "seed 3 draws a trial below the median: pick a seed that does"
    client = mlflow_client(mlflow_runs_dir)
    for row in pruned:
        assert row["epochs"] == 1 and row["note"] == "pruned at epoch 1"
        run = client.get_run(row["mlflow_run_id"])
        assert run.data.tags["stop_reason"].startswith("pruned: val_macro_f1")
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(row["mlflow_run_id"], "val_loss")] == [1]
        from ctscan.engine.checkpoint import read_checkpoint

        assert read_checkpoint(Path(row["run_dir"]) / "last.pt").epoch == 1  # stopped cleanly
    assert all(row["epochs"] == 3 for row in rows if row["state"] == "COMPLETE")
    assert result.best["params"]["train.lr"] == max(r["params"]["train.lr"] for r in rows)
    assert load_study(mlflow_runs_dir).trials[pruned[0]["number"]].state.name == "PRUNED"


@needs_optuna
@pytest.mark.slow
def test_an_interrupted_sweep_resumes_and_counts_finished_trials(
    store: Path, mlflow_runs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ctscan.engine.train as train_module

    validate, calls = train_module.validate, []

    def interrupted_validate(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:  # trial 1, epoch 1: Ctrl-C
            raise KeyboardInterrupt
        return validate(*args, **kwargs)

    monkeypatch.setattr(train_module, "validate", interrupted_validate)
    base = write_base(tmp_path, store, mlflow_runs_dir, **{"tracking.enabled": "true"})
    spec = write_spec(tmp_path, base, sweep={"pruning": False}, fixed={"train.epochs": 2})
    with pytest.raises(Interrupted) as err:
        run_sweep(spec, say=lambda line: None)
    assert err.value.exit_code == 130
    assert "sweep 'study' stopped by Ctrl-C with 1 of 3 trials finished" in err.value.message
    assert err.value.fix.startswith(f"rerun `ctscan sweep {spec} --trials 3` to continue")
    study = load_study(mlflow_runs_dir)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
    assert study.trials[1].user_attrs["interrupted"] is True
    parent_id = study.user_attrs["ctscan.parent_run_id"]
    client = mlflow_client(mlflow_runs_dir)
    assert client.get_run(parent_id).info.status == "KILLED"
    # A process killed with SIGKILL leaves its trial RUNNING, with its parameters drawn.
    killed = study.ask()
    killed.suggest_float("train.lr", 1e-3, 1e-2, log=True)
    monkeypatch.setattr(train_module, "validate", validate)
    # Another experiment is refused before anything is queued or announced.
    monkeypatch.setenv("CTSCAN_TRACKING__EXPERIMENT", "other")
    refused: list[str] = []
    with pytest.raises(CtscanError, match=r"is in experiment 'ctscan', but tracking\.experiment"):
        run_sweep(spec, trials=4, say=refused.append)
    assert refused == []
    states = [t.state.name for t in load_study(mlflow_runs_dir).trials]
    assert states == ["COMPLETE", "FAIL", "RUNNING"]
    monkeypatch.delenv("CTSCAN_TRACKING__EXPERIMENT")
    lines: list[str] = []
    result = run_sweep(spec, trials=4, say=lines.append)
    assert lines[0] == "trials 1, 2 were left unfinished: they run again"
    assert lines[1].startswith("sweep 'study': 1 of 4 trials finished, 3 to run")
    study = load_study(mlflow_runs_dir)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    retries = {t.number: t.user_attrs.get("retry_of") for t in study.trials}
    assert retries[3] == 1 and retries[4] == 2 and retries[5] is None
    assert study.trials[3].params == study.trials[1].params
    assert study.trials[4].params == study.trials[2].params
    assert result.parent_run_id == parent_id  # the same parent run, reopened and finished
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert result.summary()["trials_run_now"] == 3
    # N counts finished trials: the same command again runs nothing.
    again = run_sweep(spec, trials=4, say=lines.append)
    assert again.ran == 0 and lines[-1].startswith("sweep 'study': 4 of 4 trials finished, 0")
    assert len(load_study(mlflow_runs_dir).trials) == 6 and again.recipe == result.recipe


@needs_optuna
@pytest.mark.slow
def test_two_jobs_run_trials_in_two_processes(
    store: Path, mlflow_runs_dir: Path, tmp_path: Path
) -> None:
    base = write_base(tmp_path, store, mlflow_runs_dir, **{"tracking.enabled": "true"})
    spec = write_spec(
        tmp_path, base, sweep={"trials": 4, "pruning": False}, fixed={"train.epochs": 2}
    )
    lines: list[str] = []
    result = run_sweep(spec, jobs=2, say=lines.append)
    rows = result.summary()["trials"]
    assert [row["state"] for row in rows] == ["COMPLETE"] * 4 and len(rows) == 4
    assert sorted(line.split(":")[0] for line in lines[1:]) == [
        f"trial {n} complete" for n in range(4)
    ]
    assert {row["worker"] for row in rows} == {1, 2}
    assert len({row["run_dir"] for row in rows}) == 4
    folder = mlflow_runs_dir / "sweeps" / "study"
    assert (folder / "worker-1.log").is_file() and (folder / "worker-2.log").is_file()
    study = load_study(mlflow_runs_dir)
    spans = [(t.datetime_start, t.datetime_complete, t.user_attrs["worker"]) for t in study.trials]
    assert any(  # two trials of two workers overlapped in time
        a[0] < b[1] and b[0] < a[1] and a[2] != b[2] for a in spans for b in spans
    )
    client = mlflow_client(mlflow_runs_dir)
    parent = client.get_run(result.parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 4 and all(run.info.status == "FINISHED" for run in children)
    assert load_settings([result.recipe]).train.lr == result.best["params"]["train.lr"]


def _mid_training(trials: list[Any]) -> bool:
    """A trial finished and another is in the first half of its training (so a stop now lands
    mid-training, not in the few milliseconds of a trial's bookkeeping, where it waits)."""
    from datetime import datetime

    took = [
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in trials
        if t.state.name == "COMPLETE"
    ]
    if not took:
        return False
    now = datetime.now()
    return any(
        t.state.name == "RUNNING"
        and t.params
        and 0.1 * min(took) < (now - t.datetime_start).total_seconds() < 0.5 * min(took)
        for t in trials
    )


@needs_optuna
def test_unfinished_trials_run_again_only_as_far_as_the_study_needs_them() -> None:
    import optuna

    from ctscan.ops.sweep import requeue_unfinished

    study = optuna.create_study(direction="maximize")
    dist = optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)

    def trial(lr: float, state: str, **attrs: Any) -> None:
        frozen = optuna.trial.create_trial(
            params={"train.lr": lr},
            distributions={"train.lr": dist},
            value=0.5 if state == "COMPLETE" else None,
            state=getattr(optuna.trial.TrialState, state),
            user_attrs=attrs,
        )
        study.add_trial(frozen)

    trial(1e-3, "COMPLETE")
    trial(2e-3, "FAIL", interrupted=True)  # 1: stopped by a signal
    trial(3e-3, "FAIL", fail_reason="diverged")  # 2: its own settings: counts as finished
    trial(4e-3, "FAIL", error="OSError")  # 3: an error: runs again
    killed = study.ask()  # 4: a process that died mid-trial (SIGKILL) leaves it RUNNING
    killed.suggest_float("train.lr", 1e-4, 1e-1, log=True)

    assert requeue_unfinished(optuna, study, 0) == ([], [1, 3, 4])  # the target is met
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "FAIL", "FAIL", "FAIL"]  # nothing queued, none running
    assert requeue_unfinished(optuna, study, 2) == ([1, 3], [4])
    queued = [t for t in study.trials if t.state.name == "WAITING"]
    assert [t.user_attrs["retry_of"] for t in queued] == [1, 3]
    # A rerun before the queued trials ran: they stand for two of its slots; none is queued twice.
    assert requeue_unfinished(optuna, study, 2) == ([], [4])
    # A rerun that needs nothing names the queued retries too (they stay queued for later).
    assert requeue_unfinished(optuna, study, 0) == ([], [4, 1, 3])
    assert requeue_unfinished(optuna, study, 3) == ([4], [])
    assert sum(t.state.name == "WAITING" for t in study.trials) == 3
    retries = [study.ask() for _ in range(3)]  # queued trials come first, with their parameters
    assert [t.suggest_float("train.lr", 1e-4, 1e-1, log=True) for t in retries] == [
        2e-3,
        4e-3,
        killed.params["train.lr"],
    ]


@needs_optuna
@pytest.mark.slow
def test_sigterm_stops_a_parallel_sweep_cleanly_and_a_rerun_finishes_it(
    store: Path, tmp_path: Path
) -> None:
    import optuna

    runs = tmp_path / "runs"
    base = write_base(tmp_path, store, runs)  # tracking off: no MLflow store to create
    spec = write_spec(
        tmp_path, base, sweep={"trials": 5, "pruning": False}, fixed={"train.epochs": 4}
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTSCAN_", "MLFLOW_"))}
    command = [sys.executable, "-m", "ctscan", "sweep", str(spec), "--jobs", "2"]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            if not (runs / "optuna.db").is_file():
                continue
            try:
                study = optuna.load_study(study_name="study", storage=f"sqlite:///{runs}/optuna.db")
            except KeyError:
                continue
            # Stop while at most 3 trials are complete, so that the rerun has trials to run (a
            # trial that ends between this look and the signal makes 4).
            complete = sum(t.state.name == "COMPLETE" for t in study.trials)
            if complete < 4 and _mid_training(study.trials):
                break
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ctscan: terminated: sweep 'study' stopped by SIGTERM with ")
    assert f"Fix: rerun `ctscan sweep {spec} --trials 5 --jobs 2` to continue" in last
    assert "Traceback" not in err and out == ""
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{runs}/optuna.db")
    assert not [t for t in study.trials if t.state.name in ("PRUNED", "WAITING")]
    stopped = [t for t in study.trials if t.state.name != "COMPLETE"]
    assert stopped and all(t.user_attrs.get("interrupted") for t in stopped if t.params), [
        (t.number, t.state.name, t.params, t.user_attrs) for t in study.trials
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    recipe = Path(done.stdout.strip().splitlines()[-1])
    assert recipe == runs / "sweeps" / "study" / "best.toml"
    assert load_settings([recipe]).model.name == "cnn_gap"
    assert "were left unfinished: they run again" in done.stderr
    assert "trials finished, " in done.stderr and " complete: val_macro_f1 " in done.stderr
    as_json = subprocess.run(
        [*command, "--json"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    summary = json.loads(as_json.stdout)
    assert summary["trials_run_now"] == 0 and summary["recipe"] == str(recipe)
    counted = [t for t in summary["trials"] if t["state"] == "COMPLETE"]
    assert len(counted) == 5
    failed = [t["number"] for t in summary["trials"] if t["state"] == "FAIL" and t["params"]]
    retried = sorted(int(t["note"].split()[2].rstrip(";")) for t in counted if "retry" in t["note"])
    assert retried == failed  # every interrupted trial ran again with its parameters


@needs_optuna
@pytest.mark.slow
def test_the_cpu_smoke_spec_runs_and_its_recipe_trains(
    mlflow_runs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ctscan.engine.train import run_training

    store = write_synthetic_store(tmp_path / "store64", size=64, train=8, valid=4, test=4)
    monkeypatch.setenv("CTSCAN_PATHS__PROCESSED_DIR", str(store))
    monkeypatch.setenv("CTSCAN_PATHS__RUNS_DIR", str(mlflow_runs_dir))
    result = run_sweep(SMOKE_SPEC, say=lambda line: None)
    summary = result.summary()
    assert summary["study"] == "cpu-smoke" and summary["trials_wanted"] == 4
    finished = [r for r in summary["trials"] if r["state"] in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4 and summary["trials_per_hour"] > 0
    assert summary["param_keys"] == ["train.lr", "model.dropout", "train.ema"]
    settings = load_settings([result.recipe], ["train.epochs=1", "tracking.enabled=false"])
    assert settings.model.name == "cnn_gap" and settings.data.image_size == 64
    trained = run_training(settings, out_dir=tmp_path / "from-recipe")
    assert trained is not None and trained.test is not None and trained.test["n"] == 16


@needs_optuna
@pytest.mark.slow
def test_a_sweep_stopped_as_its_parent_run_is_created_keeps_that_parent(
    store: Path, mlflow_runs_dir: Path, tmp_path: Path, stop_as_a_run_is_created: Any
) -> None:
    """Ctrl-C an instant after MLflow created the parent run: the study records it before the
    stop acts, the run ends KILLED, and the rerun reopens it (no second parent)."""
    stop_as_a_run_is_created(True)
    base = write_base(tmp_path, store, mlflow_runs_dir, **{"tracking.enabled": "true"})
    spec = write_spec(
        tmp_path, base, sweep={"pruning": False, "trials": 1}, fixed={"train.epochs": 1}
    )
    with pytest.raises(Interrupted) as err:
        run_sweep(spec, say=lambda line: None)
    assert "sweep 'study' stopped by Ctrl-C with 0 of 1 trials finished" in err.value.message
    parent_id = load_study(mlflow_runs_dir).user_attrs["ctscan.parent_run_id"]
    client = mlflow_client(mlflow_runs_dir)
    parent = client.get_run(parent_id)
    assert parent.info.status == "KILLED" and parent.data.params["sweep.metric"] == "val_macro_f1"
    stop_as_a_run_is_created(False)
    result = run_sweep(spec, say=lambda line: None)
    assert result.parent_run_id == parent_id
    parents = client.search_runs([parent.info.experiment_id], "tags.kind = 'sweep'")
    assert [run.info.run_id for run in parents] == [parent_id]
