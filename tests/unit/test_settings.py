"""Settings: precedence, unknown keys, files, recipes, TOML round trip."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctscan.errors import SettingsError
from ctscan.settings import (
    Settings,
    deep_merge,
    find_toml,
    load_settings,
    parse_overrides,
    to_toml,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for var in list(os.environ):
        if var.startswith("CTSCAN_") and var != "CTSCAN_DEBUG":
            monkeypatch.delenv(var)


def test_precedence_cli_over_env_over_files_over_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = tmp_path / "a.toml"
    a.write_text("[train]\nepochs = 5\nlr = 0.5\nbatch_size = 8\n")
    b = tmp_path / "b.toml"
    b.write_text("[train]\nlr = 0.25\n")
    assert load_settings().train.epochs == Settings().train.epochs
    s = load_settings([a, b])
    assert (s.train.epochs, s.train.lr, s.train.batch_size) == (5, 0.25, 8)  # later file wins
    monkeypatch.setenv("CTSCAN_TRAIN__LR", "0.125")
    monkeypatch.setenv("CTSCAN_TRAIN__EPOCHS", "7")
    s = load_settings([a, b])
    assert (s.train.epochs, s.train.lr, s.train.batch_size) == (7, 0.125, 8)
    s = load_settings([a, b], ["train.lr=0.0625"])
    assert (s.train.epochs, s.train.lr, s.train.batch_size) == (7, 0.0625, 8)


def test_unknown_keys_are_rejected_with_close_matches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SettingsError, match=r"unknown settings key 'train\.epoch'.*epochs"):
        load_settings([], ["train.epoch=3"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[modle]\nname = 'cnn'\n")
    with pytest.raises(SettingsError, match=r"'modle'.*model.*bad\.toml"):
        load_settings([bad])
    monkeypatch.setenv("CTSCAN_TRAIN__EPOCS", "3")
    with pytest.raises(SettingsError, match=r"CTSCAN_TRAIN__EPOCS names no setting.*EPOCHS"):
        load_settings()
    monkeypatch.delenv("CTSCAN_TRAIN__EPOCS")
    monkeypatch.setenv("ctscan_train__epocs", "3")  # read in any case, so checked in any case
    with pytest.raises(SettingsError, match=r"ctscan_train__epocs names no setting.*EPOCHS"):
        load_settings()


def test_bad_values_name_the_key() -> None:
    with pytest.raises(SettingsError, match=r"'train\.epochs' = 'x'"):
        load_settings([], ["train.epochs=x"])
    with pytest.raises(SettingsError, match=r"model\.name"):
        load_settings([], ['model.name="vgg"'])
    with pytest.raises(SettingsError, match="not of the form"):
        parse_overrides(["train.epochs"])


def _every_numeric_key() -> list[str]:
    from ctscan.settings import _numeric

    return [
        f"{section}.{key}"
        for section, field in Settings.model_fields.items()
        for key, sub in field.annotation.model_fields.items()
        if _numeric(sub.annotation)
    ]


def test_a_boolean_is_not_read_as_a_number_from_any_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pydantic's lax mode would read true as 1: train.epochs=true would train one epoch and
    # augment.hflip=true flip every image. Every numeric key refuses it, naming where it came from.
    keys = _every_numeric_key()
    assert {"train.epochs", "train.lr", "augment.hflip", "model.frozen_stages"} <= set(keys)
    for key in keys:
        with pytest.raises(SettingsError, match=rf"'{key}' = True: a number is needed here, not"):
            load_settings([], [f"{key}=true"])
    with pytest.raises(SettingsError, match=r"not the boolean false \(from --set train\.epochs\)"):
        load_settings([], ["train.epochs=false"])
    recipe = tmp_path / "r.toml"
    recipe.write_text("[augment]\nhflip = true\n")
    with pytest.raises(SettingsError, match=rf"not the boolean true \(from {recipe}\)"):
        load_settings([recipe])
    monkeypatch.setenv("CTSCAN_TRAIN__EPOCHS", "true")
    with pytest.raises(SettingsError, match=r"from environment variable CTSCAN_TRAIN__EPOCHS"):
        load_settings()
    monkeypatch.delenv("CTSCAN_TRAIN__EPOCHS")
    # numbers still work, 0 and 1 included, and booleans where a boolean is meant
    loaded = load_settings([], ["augment.hflip=1", "model.dropout=0", "train.ema=true"])
    assert (loaded.augment.hflip, loaded.model.dropout, loaded.train.ema) == (1.0, 0.0, True)


def test_the_source_named_is_the_one_that_won(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lost = tmp_path / "lost.toml"
    lost.write_text("[augment]\nhflip = 0.3\n[train]\nepochs = 3\n")
    # pydantic-settings reads variable names in any case, and whole sections as JSON
    monkeypatch.setenv("ctscan_augment__hflip", "yes")
    with pytest.raises(SettingsError, match=r"from environment variable ctscan_augment__hflip\)"):
        load_settings([lost])
    monkeypatch.delenv("ctscan_augment__hflip")
    monkeypatch.setenv("CTSCAN_TRAIN", '{"epochs": true}')
    with pytest.raises(SettingsError, match=r"from environment variable CTSCAN_TRAIN\)"):
        load_settings([lost])
    monkeypatch.setenv("CTSCAN_TRAIN", '{"EPOCHS": true}')  # its keys in any case too
    with pytest.raises(SettingsError, match=r"from environment variable CTSCAN_TRAIN\)"):
        load_settings([lost])
    monkeypatch.delenv("CTSCAN_TRAIN")
    monkeypatch.setenv("CTSCAN_MODEL", '{"Frozen_Stages": 9}')  # a check across keys as well
    with pytest.raises(SettingsError, match=r"= 9 \(from environment variable CTSCAN_MODEL\)"):
        load_settings([])
    monkeypatch.delenv("CTSCAN_MODEL")
    # a command flag or a sweep spec is named as the caller says; several errors, one source each
    with pytest.raises(SettingsError) as info:
        load_settings(
            [], ["train.epochs=0", "augment.hflip=true"], origins={"train.epochs": "--epochs"}
        )
    message = str(info.value.message)
    assert "(from --epochs)" in message and "(from --set augment.hflip)" in message
    assert not message.endswith("--set)")  # no list of every source after lines that name theirs
    # an unknown key: full dotted suggestions and the one source that holds it, never a list
    with pytest.raises(SettingsError) as info:
        load_settings([], ["train.epoch=3"])
    message = str(info.value.message)
    assert "Did you mean: train.epochs" in message and message.endswith("(from --set train.epoch)")
    with pytest.raises(SettingsError, match=r"'trian'\. Did you mean: train.* \(from --set trian"):
        load_settings([], ["trian.lr=3"])
    lost.write_text("[train]\nlrr = 0.1\n")
    with pytest.raises(SettingsError, match=rf"Did you mean: train\.lr.* \(from {lost}\) Fix"):
        load_settings([lost])


def test_a_validator_message_reads_without_pydantic_s_prefix() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings([], ["model.name=resnet18", "model.frozen_stages=5"])
    assert "Value error" not in str(info.value)


def test_frozen_stages_fit_the_pretrained_backbone() -> None:
    assert load_settings([], ["model.frozen_stages=7"]).model.frozen_stages == 7
    assert load_settings([], ["model.name=resnet18", "model.frozen_stages=4"]).model.name
    with pytest.raises(SettingsError, match=r"resnet18 has 4 stages: set .* to 0\.\.4"):
        load_settings([], ["model.name=resnet18", "model.frozen_stages=5"])
    # Training from scratch ignores it, as it ignores freeze_epochs (the default is 3).
    assert load_settings([], ["model.name=cnn_gap", "model.frozen_stages=9"]).model.name
    assert load_settings([], ["model.pretrained=false", "model.frozen_stages=9"]).model.name


def test_a_check_across_keys_names_each_key_and_where_it_was_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[model]\nname = "resnet18"\n')
    with pytest.raises(SettingsError) as info:
        load_settings([recipe], ["model.frozen_stages=5"])
    assert str(info.value).startswith(
        f"'model.frozen_stages' = 5 (from --set model.frozen_stages), "
        f"'model.name' = 'resnet18' (from {recipe}): resnet18 has 4 stages"
    )
    assert "{" not in str(info.value)  # not the whole section's input
    monkeypatch.setenv("CTSCAN_AUGMENT__SCALE_MIN", "2")
    with pytest.raises(SettingsError) as info:
        load_settings([])
    message = str(info.value)
    assert (
        "'augment.scale_min' = 2.0 (from environment variable CTSCAN_AUGMENT__SCALE_MIN)" in message
    )
    assert "'augment.scale_max' = 1.1 (from the default): scale_min must not exceed" in message
    assert "(from environment, --set)" not in message  # every key has its own source


def test_missing_or_broken_files_are_errors(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings([tmp_path / "nope.toml"])
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nepochs = 1")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings([broken])


def test_recipe_names_resolve_in_settings_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert find_toml("cnn-cuda") == Path("settings/cnn-cuda.toml")
    with pytest.raises(SettingsError, match=r"Recipes in settings/: .*cnn-cuda"):
        find_toml("cnn-cudaa")


def test_every_recipe_file_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    recipes = sorted(Path("settings").glob("*.toml"))
    assert len(recipes) >= 5
    for recipe in recipes:
        load_settings([recipe])


# The from-scratch recipes are the settings docs/results.md measured ("Training from scratch"):
# the 224 px recipe with the overrides its command gave (the bench pinned one thread and the CPU).
MEASURED_SCRATCH = {
    "cnn-scratch": (
        "cnn-cuda",
        [
            "data.image_size=64",
            'paths.processed_dir="outputs/processed64"',
            'model.name="cnn_gap"',
            "model.dropout=0.2",
            "train.epochs=60",
            'train.select_metric="val_loss"',
            "train.early_stop_patience=10",
            "train.ema=false",
            "train.ema_warmup=true",  # inert with EMA off; cnn-cuda pins it off
        ],
    ),
    "resnet18-scratch": (
        "resnet18-cuda",
        [
            "data.image_size=64",
            'paths.processed_dir="outputs/processed64"',
            "train.epochs=40",
            "train.ema_warmup=false",
        ],
    ),
}


@pytest.mark.parametrize("recipe", sorted(MEASURED_SCRATCH))
def test_scratch_recipes_are_the_measured_settings(
    recipe: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    base, overrides = MEASURED_SCRATCH[recipe]
    bench = ['train.device="cpu"', "train.threads=1"]
    measured = load_settings([base], [*overrides, *bench]).model_dump()
    assert load_settings([recipe], bench).model_dump() == measured


def test_default_toml_mirrors_the_defaults() -> None:
    with (ROOT / "settings" / "default.toml").open("rb") as fh:
        data = tomllib.load(fh)
    assert Settings.model_validate(data) == Settings()
    assert to_toml(Settings()).strip() == (ROOT / "settings" / "default.toml").read_text().strip()


@settings(max_examples=30, deadline=None)
@given(
    epochs=st.integers(1, 500),
    lr=st.floats(1e-6, 1.0, allow_nan=False),
    ema=st.booleans(),
    name=st.sampled_from(["cnn", "cnn_gap", "resnet18", "efficientnet_lite0"]),
    raw=st.text(
        st.characters(codec="ascii", exclude_characters='"\\\x7f', min_codepoint=32), max_size=20
    ),
)
def test_toml_round_trip(epochs: int, lr: float, ema: bool, name: str, raw: str) -> None:
    s = Settings.model_validate(
        {
            "train": {"epochs": epochs, "lr": lr, "ema": ema},
            "model": {"name": name},
            "paths": {"raw_dir": raw if raw.strip() else "x"},  # blank paths are refused
        }
    )
    back = Settings.model_validate(tomllib.loads(to_toml(s)))
    assert back == s


@given(
    st.dictionaries(
        st.sampled_from("abc"),
        st.integers() | st.dictionaries(st.sampled_from("xy"), st.integers()),
    )
)
def test_deep_merge_is_identity_with_empty_and_idempotent(d: dict) -> None:
    assert deep_merge(d, {}) == d
    assert deep_merge({}, d) == d
    assert deep_merge(d, d) == d


@pytest.mark.parametrize("key", ["raw_dir", "processed_dir", "runs_dir"])
@pytest.mark.parametrize("value", ['""', '"  "'])
def test_empty_paths_are_refused_naming_the_key(key: str, value: str, tmp_path: Path) -> None:
    # An empty path would silently become "." (the current folder).
    with pytest.raises(SettingsError, match=rf"'paths\.{key}' = .*empty path") as err:
        load_settings([], [f"paths.{key}={value}"])
    assert "--set" in str(err.value)
    toml = tmp_path / "empty.toml"
    toml.write_text(f"[paths]\n{key} = {value}\n")
    with pytest.raises(SettingsError, match=rf"'paths\.{key}'.*empty path"):
        load_settings([toml])


def test_an_empty_path_in_the_cli_form_and_the_environment_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(SettingsError, match=r"'paths\.runs_dir' = ''.*empty path"):
        load_settings([], ["paths.runs_dir="])  # `--set paths.runs_dir=`
    monkeypatch.setenv("CTSCAN_PATHS__RUNS_DIR", "")
    with pytest.raises(SettingsError, match=r"'paths\.runs_dir' = ''.*empty path") as err:
        load_settings()
    assert "environment" in str(err.value)


def test_an_empty_weights_path_is_refused_and_unset_stays_none() -> None:
    with pytest.raises(SettingsError, match=r"'model\.weights_path'.*empty path"):
        load_settings([], ['model.weights_path=""'])
    assert load_settings().model.weights_path is None
    assert load_settings([], ['model.weights_path="w.pt"']).model.weights_path == Path("w.pt")
    assert load_settings([], ['paths.runs_dir="."']).paths.runs_dir == Path(".")  # explicit


def test_a_directory_given_as_settings_file_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "mine.toml").write_text("[train]\nepochs = 2\n")
    for name in (folder, f"{folder}/"):
        with pytest.raises(SettingsError, match="is a directory; a TOML file is expected") as err:
            find_toml(name)
        assert "does not exist" not in str(err.value)
        assert str(folder / "mine.toml") in str(err.value)  # what it could have meant


def test_the_serve_token_is_never_shown_or_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    from ctscan.settings import flatten, public_dict, to_toml

    monkeypatch.setenv("CTSCAN_SERVE__TOKEN", "s3cret-t0ken")
    settings = load_settings()
    assert settings.serve.token == "s3cret-t0ken"  # the server gets it
    assert "s3cret" not in to_toml(settings)
    assert "s3cret" not in str(flatten(settings)) and "s3cret" not in str(public_dict(settings))
    assert "token = (set, not shown)" in to_toml(settings)
