"""A store is refused once the raw images or the data settings it was made from change."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from ctscan.data.preprocess import run_preprocess
from ctscan.data.store import open_store
from ctscan.errors import DataError
from ctscan.settings import load_settings
from tests.conftest import save_gray, smooth_image


def test_stale_store_is_refused(make_raw_tree: Callable[[str], Path], tmp_path: Path) -> None:
    raw = make_raw_tree("minimal")
    out = tmp_path / "processed"
    settings = load_settings(
        [], [f'paths.raw_dir="{raw}"', f'paths.processed_dir="{out}"', "data.image_size=32"]
    )
    run_preprocess(settings)
    data = settings.data.model_dump()
    store = open_store(out, expect_data=data)
    assert store.counts["train"] > 0
    with pytest.raises(DataError, match="image_size"):
        open_store(out, expect_data={**data, "image_size": 64})
    with pytest.raises(DataError, match="on_leak"):
        open_store(out, expect_data={**data, "on_leak": "drop"})
    # A new raw image: the store no longer matches the data.
    folder = next(p for p in (raw / "train").iterdir() if p.is_dir())
    save_gray(smooth_image(99, 40, 40).astype(np.uint8), folder / "new.png")
    with pytest.raises(DataError, match="raw images changed"):
        open_store(out, expect_data=data)
    # Without the raw folder on disk (a copied store) the settings check alone applies.
    moved = tmp_path / "elsewhere"
    raw.rename(moved)
    assert open_store(out, expect_data=data).counts == store.counts
