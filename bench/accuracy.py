"""Test accuracy of recipes over seeds (model selection on valid; test read once, at the end).

For every recipe and seed: `ctscan train` with that recipe (in-process), the best-on-valid
checkpoint evaluated on the test split, and on its leak-free part. Writes JSON and prints a
markdown table of mean +- std.

    python bench/accuracy.py --recipes efficientnet_lite0-cuda cnn-cuda resnet18-cuda --seeds 0 1 2
    python bench/accuracy.py --table bench/results/scratch64/*.json   # one row per JSON file

Seeds run one after another; to share them over parallel processes, write NAME.PART.json
files (e.g. `--seeds 0 1 --out x.s01.json` and `--seeds 2 --out x.s2.json`): `--table` makes
one row NAME of all the files whose name starts with `NAME.`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from ctscan.engine.train import run_training
from ctscan.settings import load_settings


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} +- {sd:.3f}"


def markdown_table(by_name: dict[str, list[dict]]) -> list[str]:
    """One row per recipe: mean +- std over its seeds, and the median wall time of a seed."""
    table = [
        "| recipe | test accuracy | test macro-F1 | test ECE | leak-free accuracy "
        "| leak-free macro-F1 | best val accuracy | seeds | median s/seed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, rs in by_name.items():

        def col(key: str, rs: list[dict] = rs) -> list[float]:
            return [r[key] for r in rs if r.get(key) is not None]

        seconds = statistics.median(col("seconds")) if col("seconds") else float("nan")
        table.append(
            f"| {name} | {mean_std(col('test_accuracy'))} | {mean_std(col('test_macro_f1'))} "
            f"| {mean_std(col('test_ece'))} "
            f"| {mean_std(col('leak_free_accuracy'))} | {mean_std(col('leak_free_macro_f1'))} "
            f"| {mean_std(col('best_val_accuracy'))} | {len(rs)} | {seconds:.0f} |"
        )
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+")
    ap.add_argument(
        "--table",
        nargs="+",
        type=Path,
        help="print the table of earlier JSON files and stop (NAME.PART.json files: one row)",
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--runs-dir", default="outputs/accuracy")
    ap.add_argument("--out", default="bench/results/accuracy.json")
    args = ap.parse_args()
    if args.table:
        by_name: dict[str, list[dict]] = {}
        for path in args.table:
            try:
                rows = json.loads(path.read_text())["rows"]
                by_name.setdefault(path.name.split(".")[0], []).extend(rows)
            except (OSError, ValueError, KeyError) as exc:
                raise SystemExit(f"accuracy.py: cannot read rows from '{path}': {exc}") from None
        print("\n".join(markdown_table(by_name)))
        return
    if not args.recipes:
        ap.error("give --recipes to train, or --table to summarise earlier JSON files")

    rows = []
    for recipe in args.recipes:
        for seed in args.seeds:
            settings = load_settings(
                [recipe],
                [*args.overrides, f"train.seed={seed}", f'paths.runs_dir="{args.runs_dir}"'],
            )
            t0 = time.perf_counter()
            result = run_training(settings, out_dir=Path(args.runs_dir) / f"{recipe}-s{seed}")
            test, lf = result.test or {}, (result.test or {}).get("leak_free") or {}
            row = {
                "recipe": recipe,
                "model": settings.model.name,
                "seed": seed,
                "best_epoch": result.best_epoch,
                "val_" + result.select_metric.removeprefix("val_"): result.best_value,
                "best_val_accuracy": result.history[result.best_epoch - 1]["val_accuracy"],
                "test_accuracy": test.get("accuracy"),
                "test_macro_f1": test.get("macro_f1"),
                "test_ece": test.get("ece"),  # after the temperature fitted on valid
                "test_ece_floor": test.get("ece_floor"),  # what perfect calibration would read
                "test_n": test.get("n"),
                "leak_free_accuracy": lf.get("accuracy"),
                "leak_free_macro_f1": lf.get("macro_f1"),
                "leak_free_n": lf.get("n"),
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"rows": rows}, indent=2))  # partial results
    table = markdown_table({r: [row for row in rows if row["recipe"] == r] for r in args.recipes})
    print("\n".join(table))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "table": table}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
