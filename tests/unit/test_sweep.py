"""`ctscan sweep`: spec checks, the study, nested MLflow runs, pruning, stops and retries.

Real Optuna, a real MLflow SQLite store and the real training loop on the synthetic store; the
slow tests train (a few short trials each). Several processes sharing one PostgreSQL study:
test_sweep_postgres.py.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ctscan.ops.sweep_spec as spec_module
from ctscan.errors import CtscanError, Interrupted, SettingsError
from ctscan.ops.sweep import SweepError, open_study, run_sweep, storage_errors, study_lock
from ctscan.ops.sweep_spec import find_spec, parse_spec, prepare
from ctscan.settings import load_settings, toml_value
from tests.processes import ctscan_in_process, ctscan_stopped
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


def opened(sweep: Any) -> Any:
    """The study as `ctscan sweep` opens it (under its lock)."""
    import optuna

    with storage_errors(sweep), study_lock(sweep):
        return open_study(optuna, sweep)


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
            r"'params\.train\.lrr': unknown settings key 'train\.lrr'\. Did you mean: train\.lr",
        ),
        ({"params": {"train.lr": {"low": 0.1, "high": 0.01}}}, r"low 0\.1 must be below high"),
        (
            {"params": {"train.lr": {"low": 0.0, "high": 0.1, "log": True}}},
            "log range needs low > 0",
        ),
        (
            {"sweep": {"metric": "val_acc"}},
            r"'sweep\.metric' = 'val_acc': .*Did you mean: val_accuracy",
        ),
        (
            {"sweep": {"metric": "test_accuracy"}},
            r"'sweep\.metric' = 'test_accuracy': Input should be 'val_macro_f1'",
        ),
        ({"sweep": {}}, r"'sweep\.metric': Field required"),
        (
            {"sweep": {"metric": "val_macro_f1", "sampler": "grid"}},
            "'sweep.sampler' = 'grid': Input should be 'tpe' or 'random'",
        ),
        ({"sweep": {"metric": "val_loss", "direction": "maximize"}}, "the worst models"),
        (
            {"sweep": {"metric": "val_macro_f1", "direction": "up"}},
            "'sweep.direction' = 'up': Input should be 'maximize' or 'minimize'",
        ),
        (
            {"sweep": {"metric": "val_macro_f1", "sampeler": "tpe"}},
            r"unknown spec key 'sweep\.sampeler'\. Did you mean: sweep\.sampler",
        ),
        (
            {"sweep": {"metric": "val_macro_f1", "trials": 0}},
            "'sweep.trials' = 0: Input should be greater than or equal to 1",
        ),
        (
            {"sweep": {"metric": "val_loss", "grace_period": 0}},
            "'sweep.grace_period' = 0: Input should be greater than or equal to 1",
        ),
        (
            {"sweep": {"metric": "val_macro_f1", "seed": "1"}},
            "'sweep.seed' = '1': Input should be a valid integer",
        ),
        ({"params": {}}, "nothing to search"),
        ({"params": {"train.epochs": {"low": 1.5, "high": 4}}}, "must be integers"),
        ({"params": {"model.name": {"low": 1, "high": 2}}}, "not a number setting"),
        (
            {"params": {"train.lr": {"low": 1e-3, "high": 1e-2, "choices": [1e-3]}}},
            "both choices and low, high",
        ),
        (
            {"params": {"train.lr": {"choices": []}}},
            r"'params\.train\.lr\.choices' = \[\]: Tuple should have at least 1 item",
        ),
        ({"params": {"train.lr": {"choices": [0.1, 0.1]}}}, "distinct"),
        ({"params": {"train.lr": {"high": 0.1}}}, "needs low and high"),
        (
            {"params": {"train.lr": {"lo": 1e-3, "high": 1.0}}},
            r"unknown spec key 'params\.train\.lr\.lo'\. Did you mean: params\.train\.lr\.low",
        ),
        (
            {"params": {"train.lr": 0.1}},
            r"'params\.train\.lr' = 0\.1: Input should be a valid dictionary",
        ),
        (
            {"params": {"train.lr": {"low": 1e-3, "high": 1e-2, "log": True, "step": 1e-3}}},
            "cannot go with log",
        ),
        ({"params": {"paths.runs_dir": {"choices": ["a", "b"]}}}, r"move 'paths\.runs_dir' to"),
        ({"params": {"train.evaluate_test": {"choices": [True]}}}, "sets for every trial"),
        ({**GOOD, "fixed": {"train": {"select_metric": "val_loss"}}}, "sets for every trial"),
        ({**GOOD, "fixed": {"train.lr": 0.1}}, r"both in \[fixed\] and in \[params\]"),
        ({**GOOD, "fixed": {"train.epoch": 2}}, r"Did you mean: train\.epochs"),
        ({**GOOD, "sweeps": {}}, r"unknown spec key 'sweeps'\. Did you mean: sweep"),
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
    ready = prepare(spec, trials=4, name="lr-search")
    assert ready.db == (tmp_path / "runs" / "optuna.db").resolve()
    assert ready.storage_url == f"sqlite:///{ready.db}"
    assert ready.folder == tmp_path / "runs" / "sweeps" / "lr-search"
    assert ready.command == f"ctscan sweep {spec} --trials 4 --name lr-search"
    forced = ready.forced()
    assert forced["train.evaluate_test"] is False and forced["tracking.log_model"] is False
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
    real = spec_module.load_settings
    monkeypatch.setattr(
        spec_module, "load_settings", lambda *a, **k: loads.append(1) or real(*a, **k)
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
    good = write_spec(tmp_path, base, name="good")
    for args, code, expected in [
        (["missing.toml"], 2, "sweep spec 'missing.toml' does not exist"),
        (
            [str(bad_key)],
            2,
            "'params.train.lrr': unknown settings key 'train.lrr'. Did you mean: train.lr",
        ),
        ([str(bad_key), "--trials", "0"], 2, "Invalid value for '--trials'"),
        ([str(good), "--storage", "mysql://u@h/db"], 2, "--storage 'mysql://u@h/db' is neither"),
        ([str(good), "--set", "train.lrr=1"], 2, "unknown settings key 'train.lrr'"),
        ([str(good), "--set", "train.lr=0.1"], 2, "--set train.lr: the sweep searches it"),
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
    """Not in the spec nor the base files, yet deciding a trial: ctscan's defaults,
    CTSCAN_* variables and --set. A new trial must train as the earlier ones."""
    from ctscan.ops.sweep import ATTR_SETTINGS

    for var in [v for v in os.environ if v.upper().startswith("CTSCAN_")]:
        monkeypatch.delenv(var)
    base = write_base(tmp_path, tmp_path / "store", tmp_path / "runs", **{"train.ema": "true"})
    spec = write_spec(tmp_path, base)
    study = opened(prepare(spec))
    assert study.user_attrs[ATTR_SETTINGS]["train"]["ema_warmup"] is True
    monkeypatch.setenv("CTSCAN_TRAIN__WEIGHT_DECAY", "0.05")
    with pytest.raises(SweepError, match=r"train\.weight_decay 0\.01 -> 0\.05") as err:
        opened(prepare(spec))
    assert "--set train.weight_decay=0.01" in str(err.value.fix)
    monkeypatch.delenv("CTSCAN_TRAIN__WEIGHT_DECAY")
    with pytest.raises(SweepError, match=r"train\.ema_warmup True -> False"):
        opened(prepare(spec, overrides=["train.ema_warmup=false"]))
    monkeypatch.setenv("CTSCAN_TRACKING__EXPERIMENT", "elsewhere")  # where, not how: allowed
    opened(prepare(spec, overrides=["train.threads=1", "paths.processed_dir=/elsewhere"]))


@needs_optuna
def test_a_changed_spec_is_refused_with_the_fix(tmp_path: Path) -> None:
    base = write_base(tmp_path, tmp_path / "store", tmp_path / "runs")
    spec = write_spec(tmp_path, base)
    study = opened(prepare(spec))
    assert opened(prepare(spec)).user_attrs == study.user_attrs
    write_spec(tmp_path, base, params={"train.lr": {"low": 1e-3, "high": 1e-1, "log": True}})
    with pytest.raises(SweepError, match=r"another spec \(params\.train\.lr\.high: 0\.01 -> 0\.1"):
        opened(prepare(spec))
    write_spec(tmp_path, base)  # the spec back, but a base setting changed
    base.write_text(base.read_text().replace("train.batch_size=16", "train.batch_size=8"))
    with pytest.raises(SweepError, match=r"base\.train\.batch_size: 16 -> 8") as err:
        opened(prepare(spec))
    assert "--name study-2" in err.value.fix and "optuna delete-study" in err.value.fix
    assert "\n" not in str(err.value)
    assert opened(prepare(spec, name="study-2")).trials == []


def test_set_reaches_every_trial_and_the_recipe(tmp_path: Path) -> None:
    """`--set` as every command has it: above the base files and the spec's [fixed], below
    the drawn values (a swept or forced key is refused), and part of the recipe."""
    base = write_base(tmp_path, tmp_path / "store", tmp_path / "runs")
    spec = write_spec(tmp_path, base, fixed={"train.epochs": 2, "model.dropout": 0.1})
    sweep = prepare(spec, overrides=["train.epochs=3", "train.weight_decay=0.02"])
    trial = sweep.trial_settings({"train.lr": 0.004})
    assert (trial.train.epochs, trial.train.weight_decay, trial.model.dropout) == (3, 0.02, 0.1)
    assert sweep.command.endswith("--set train.epochs=3 --set train.weight_decay=0.02")
    best = {"number": 0, "value": 0.5, "epochs": 3, "params": {"train.lr": 0.004}}
    recipe = load_settings([spec_module.write_recipe(sweep, best, tmp_path / "r.toml")])
    assert (recipe.train.epochs, recipe.train.weight_decay, recipe.train.lr) == (3, 0.02, 0.004)
    for key in ("train.lr=0.1", "train.evaluate_test=true"):
        with pytest.raises(SettingsError, match=f"--set {key.split('=')[0]}: the sweep"):
            prepare(spec, overrides=[key])


def test_a_storage_url_is_checked_and_its_password_never_shown(tmp_path: Path) -> None:
    base = write_base(tmp_path, tmp_path / "store", tmp_path / "runs")
    spec = write_spec(tmp_path, base)
    url = "postgresql://me:s3cret@db.example:5432/optuna"
    sweep = prepare(spec, storage=url)
    assert sweep.storage_url == "postgresql+psycopg://me:s3cret@db.example:5432/optuna"
    assert sweep.db is None and "s3cret" not in sweep.where + sweep.command
    assert sweep.where == "postgresql+psycopg://me:***@db.example:5432/optuna"
    assert prepare(spec, storage=f"sqlite:///{tmp_path}/o.db").db == tmp_path / "o.db"
    for bad in ("mysql://u@h/db", "optuna.db", "sqlite://"):
        with pytest.raises(SettingsError, match="neither a SQLite file nor a PostgreSQL"):
            prepare(spec, storage=bad)


@needs_optuna
def test_an_unreachable_storage_or_a_missing_driver_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spec = write_spec(tmp_path, write_base(tmp_path, tmp_path / "store", tmp_path / "runs"))
    url = f"postgresql+psycopg://me:s3cret@127.0.0.1:{port}/optuna"
    with pytest.raises(SweepError, match="cannot use the Optuna storage") as err:
        run_sweep(spec, storage=url, say=lambda line: None)
    assert "s3cret" not in str(err.value) and "\n" not in str(err.value)
    assert "--storage postgresql+psycopg://me:***@" in err.value.fix
    monkeypatch.setitem(sys.modules, "psycopg", None)  # the sweep extra without psycopg
    with pytest.raises(SweepError, match="needs a driver that cannot be imported") as err:
        run_sweep(spec, storage=url, say=lambda line: None)
    assert "pip install 'ctscan[sweep]'" in err.value.fix and "s3cret" not in str(err.value)


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
            opened(prepare(spec, name=name))
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
@pytest.mark.parametrize("when", ["before training", "after training"])
def test_a_stop_anywhere_in_a_trial_queues_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """A SIGTERM that lands in a trial's bookkeeping (before or after its training) never
    loses the trial: it ends FAIL and a copy with its parameters waits for the next run."""
    import optuna

    from ctscan.engine.train import TrainResult
    from ctscan.jobs import on_stop
    from ctscan.ops.sweep import ATTR_EPOCHS, ATTR_PROCESS

    base = write_base(tmp_path, tmp_path / "store", tmp_path / "runs")
    spec = write_spec(tmp_path, base)
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
    key = ATTR_PROCESS if when == "before training" else ATTR_EPOCHS

    def stopped_midway(trial: Any, name: str, value: Any) -> None:
        set_attr(trial, name, value)
        if name == key and trial.number == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # Python code keeps running: the handler fires here

    monkeypatch.setattr(optuna.Trial, "set_user_attr", stopped_midway)
    previous = signal.signal(signal.SIGTERM, on_stop)  # as cli.main has it
    try:
        with pytest.raises(Interrupted) as err:
            run_sweep(spec, say=lambda line: None)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert err.value.exit_code == 143 and "1 of 3 trials finished" in err.value.message
    study = load_study(tmp_path / "runs")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "WAITING"]
    assert study.trials[2].params == study.trials[1].params
    assert len(trained) == (1 if when == "before training" else 2)
    result = run_sweep(spec, say=lambda line: None)  # the rerun runs the copy first
    rows = result.summary()["trials"]
    assert [r["state"] for r in rows] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert rows[1]["note"] == "stopped; runs again as 2" and rows[2]["note"] == "retry of 1"


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
    store: Path,
    mlflow_runs_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    ctrl_c_in_validation: Callable[[int | None], None],
) -> None:
    import optuna

    ctrl_c_in_validation(3)  # trial 1, epoch 1: Ctrl-C
    base = write_base(tmp_path, store, mlflow_runs_dir, **{"tracking.enabled": "true"})
    spec = write_spec(
        tmp_path,
        base,
        sweep={"pruning": False, "heartbeat_interval": 1, "grace_period": 1},
        fixed={"train.epochs": 2},
    )
    with pytest.raises(Interrupted) as err:
        run_sweep(spec, say=lambda line: None)
    assert err.value.exit_code == 130
    assert "sweep 'study' stopped by Ctrl-C with 1 of 3 trials finished" in err.value.message
    assert err.value.fix.startswith(f"rerun `ctscan sweep {spec} --trials 3` to continue")
    study = load_study(mlflow_runs_dir)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "WAITING"]
    assert study.trials[2].params == study.trials[1].params  # queued again, as it was drawn
    parent_id = study.user_attrs["ctscan.parent_run_id"]
    client = mlflow_client(mlflow_runs_dir)
    assert client.get_run(parent_id).info.status == "KILLED"
    trial_runs = client.search_runs([client.get_run(parent_id).info.experiment_id])
    assert "RUNNING" not in {run.info.status for run in trial_runs}
    # A process killed with SIGKILL leaves its trial RUNNING: its heartbeat stops.
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{mlflow_runs_dir / 'optuna.db'}", heartbeat_interval=1
    )
    loaded = optuna.load_study(study_name="study", storage=storage)
    killed = optuna.Trial(loaded, storage.create_new_trial(loaded._study_id))  # not the queued
    killed.suggest_float("train.lr", 1e-3, 1e-2, log=True)
    storage.record_heartbeat(killed._trial_id)
    ctrl_c_in_validation(None)
    # Another experiment is refused before anything runs or is announced.
    monkeypatch.setenv("CTSCAN_TRACKING__EXPERIMENT", "other")
    refused: list[str] = []
    with pytest.raises(CtscanError, match=r"is in experiment 'ctscan', but tracking\.experiment"):
        run_sweep(spec, trials=4, say=refused.append)
    assert refused == []
    monkeypatch.delenv("CTSCAN_TRACKING__EXPERIMENT")
    time.sleep(2.5)  # past the grace period: the killed trial is stale
    lines: list[str] = []
    result = run_sweep(spec, trials=4, say=lines.append)
    assert lines[0].startswith("sweep 'study': 1 of 4 trials finished, 3 to run")
    study = load_study(mlflow_runs_dir)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    rows = result.summary()["trials"]
    assert rows[2]["note"] == "retry of 1" and rows[4]["note"] == "retry of 3"
    assert rows[3]["note"] == "its process stopped beating (heartbeat); runs again as 4"
    assert study.trials[4].params == killed.params
    assert result.parent_run_id == parent_id  # the same parent run, reopened and finished
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert result.summary()["trials_run_now"] == 3
    # N counts finished trials: the same command again runs nothing.
    again = run_sweep(spec, trials=4, say=lines.append)
    assert again.ran == 0 and lines[-1].startswith("sweep 'study': 4 of 4 trials finished, 0")
    assert len(load_study(mlflow_runs_dir).trials) == 6 and again.recipe == result.recipe


@needs_optuna
@pytest.mark.slow
def test_ctrl_c_stops_a_sweep_cleanly_and_a_rerun_finishes_it(
    store: Path, mlflow_runs_dir: Path, tmp_path: Path
) -> None:
    """End to end: a real SIGINT to `ctscan sweep` mid-trial, exit 130 and one line; no MLflow
    run left RUNNING; the same command (in this process) finishes the N trials, the stopped one
    run again."""
    import optuna

    runs = mlflow_runs_dir
    base = write_base(tmp_path, store, runs, **{"tracking.enabled": "true"})
    spec = write_spec(
        tmp_path, base, sweep={"trials": 3, "pruning": False}, fixed={"train.epochs": 2}
    )
    storage = f"sqlite:///{runs}/optuna.db"
    # the Ctrl-C lands in trial 2's first validation (trial 1 validated its 2 epochs)
    proc = ctscan_stopped(["sweep", str(spec)], signal.SIGINT, at=3, cwd=tmp_path)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        "ctscan: interrupted: sweep 'study' stopped by Ctrl-C with 1 of 3 trials finished"
    ), err
    assert f"Fix: rerun `ctscan sweep {spec} --trials 3` to continue" in last
    assert "Traceback" not in err and out == ""
    client = mlflow_client(runs)
    experiment = client.get_experiment_by_name("ctscan").experiment_id
    statuses = [run.info.status for run in client.search_runs([experiment])]
    assert "KILLED" in statuses and "RUNNING" not in statuses
    study = optuna.load_study(study_name="study", storage=storage)
    stopped = [t for t in study.trials if t.state.name == "FAIL"]
    assert len(stopped) == 1 and stopped[0].user_attrs["error"] == "stopped"
    done = ctscan_in_process("sweep", str(spec), cwd=tmp_path)  # the process was the stop
    recipe = Path(done.stdout.strip().splitlines()[-1])
    assert recipe == runs / "sweeps" / "study" / "best.toml"
    assert load_settings([recipe]).model.name == "cnn_gap"
    study = optuna.load_study(study_name="study", storage=storage)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3 and len(study.trials) == 4
    assert any(t.params == stopped[0].params for t in complete)  # run again, same parameters
    statuses = [run.info.status for run in client.search_runs([experiment])]
    assert "RUNNING" not in statuses and statuses.count("FINISHED") == 4  # 3 trials + parent


@needs_optuna
@pytest.mark.slow
def test_the_cpu_smoke_spec_runs_and_its_recipe_trains(
    mlflow_runs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ctscan.engine.train import run_training

    store = write_synthetic_store(tmp_path / "store64", size=64, train=8, valid=4, test=4)
    monkeypatch.setenv("CTSCAN_PATHS__PROCESSED_DIR", str(store))
    monkeypatch.setenv("CTSCAN_PATHS__RUNS_DIR", str(mlflow_runs_dir))
    monkeypatch.setenv("CTSCAN_TRAIN__THREADS", "1")  # two pytest workers share the cores
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
