"""Training progress on stderr: a live rich bar, or one plain line per epoch in quiet mode."""

from __future__ import annotations

import sys
from typing import Any

from ctscan.errors import say_line


class Progress:
    """Shows live loss, accuracy, lr and img/s; silent on non-main ranks."""

    def __init__(self, *, enabled: bool, quiet: bool, epochs: int, steps: int) -> None:
        self.enabled = enabled
        self.quiet = quiet or not sys.stderr.isatty()
        self.epochs = epochs
        self.steps = steps
        self._progress: Any = None
        self._task: Any = None

    @property
    def live(self) -> bool:
        """Whether per-step updates are shown (a live bar on rank 0)."""
        return self.enabled and not self.quiet

    def __enter__(self) -> Progress:
        if not self.live:
            return self
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self._progress = RichProgress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=self.steps, epoch="-", stats="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def start_epoch(self, epoch: int) -> None:
        if self._progress is not None:
            self._progress.reset(self._task, total=self.steps)
            self._progress.update(self._task, epoch=f"{epoch}/{self.epochs}", stats="")

    def step(self, loss: float, accuracy: float, lr: float, images_per_s: float) -> None:
        if self._progress is not None:
            stats = f"loss {loss:.4f} acc {accuracy:.3f} lr {lr:.2e} {images_per_s:,.0f} img/s"
            self._progress.update(self._task, advance=1, stats=stats)

    def epoch_line(self, row: dict[str, Any], best: bool) -> None:
        mark = " *" if best else ""
        self.log(
            f"epoch {row['epoch']:>3}/{self.epochs}  "
            f"train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.3f}  "
            f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.3f} "
            f"f1 {row['val_macro_f1']:.3f}  lr {row['lr']:.2e}  "
            f"{row['train_images_per_s']:,.1f} img/s  {row['epoch_seconds']:.1f} s{mark}"
        )

    def log(self, message: str) -> None:
        if self._progress is not None:  # live: only when enabled
            self._progress.console.print(message, highlight=False, markup=False, soft_wrap=True)
        elif self.enabled:
            say_line(message)
