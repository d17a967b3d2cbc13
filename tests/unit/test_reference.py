"""The generated CLI and settings references in docs/ are current."""

from __future__ import annotations

from ctscan import reference
from ctscan.settings import Settings


def test_docs_cli_and_settings_references_are_not_stale() -> None:
    stale = [
        str(path)
        for path, text in reference.documents().items()
        if not path.is_file() or path.read_text() != text
    ]
    assert not stale, f"stale: {stale}; run `python -m ctscan.reference`"


def test_every_settings_key_and_command_is_documented() -> None:
    settings_doc = reference.settings_reference()
    for section, field in Settings.model_fields.items():
        for key, info in field.annotation.model_fields.items():
            assert f"`{section}.{key}`" in settings_doc
            assert info.description, f"{section}.{key} has no description"
    cli_doc = reference.cli_reference()
    for command in ("preprocess", "audit", "train", "evaluate", "predict", "settings show"):
        assert f"## `ctscan {command}`" in cli_doc
    assert "`--resume`" in cli_doc and "(default: paths.runs_dir/" in cli_doc
