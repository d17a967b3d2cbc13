"""ctscan: train, check and serve chest-CT slice classifiers."""

__version__ = "0.1.0"

CLASS_NAMES: tuple[str, ...] = (
    "adenocarcinoma",
    "large_cell_carcinoma",
    "squamous_cell_carcinoma",
    "normal",
)
