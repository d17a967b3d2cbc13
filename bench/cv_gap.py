"""How far the selection signal is from test: the valid split vs K-fold cross-validation.

For each seed, a normal run (`ctscan train`: best epoch on the 72-image valid split) gives its
best valid accuracy and its test accuracy. Then one `ctscan train --folds K` on the same recipe
gives the held-out accuracy of its K fold models (mean +- std), the pooled out-of-fold accuracy
over all train + valid images, and (read once, at the end) the fold models' test accuracy and
that of their averaged probabilities. The gap is selection signal minus test accuracy.

    python bench/cv_gap.py --set data.image_size=96 --set paths.processed_dir=... --folds 5

Writes bench/results/cv_gap.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from ctscan.engine.train import run_training
from ctscan.ops.cv import run_cv
from ctscan.settings import load_settings


def mean_std(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-s", "--settings", dest="files", action="append", default=[])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--cv-seed", type=int, default=0)
    ap.add_argument("--runs-dir", default="outputs/cv-gap")
    ap.add_argument("--out", default="bench/results/cv_gap.json")
    args = ap.parse_args()
    runs = Path(args.runs_dir)
    base = [*args.overrides, f'paths.runs_dir="{runs}"', "tracking.enabled=false"]

    single = []
    for seed in args.seeds:
        settings = load_settings(args.files, [*base, f"train.seed={seed}"])
        t0 = time.perf_counter()
        result = run_training(settings, out_dir=runs / f"single-s{seed}-{time.strftime('%H%M%S')}")
        assert result is not None and result.test is not None
        best = result.history[result.best_epoch - 1]
        single.append(
            {
                "seed": seed,
                "best_epoch": result.best_epoch,
                "val_accuracy": best["val_accuracy"],
                "test_accuracy": result.test["accuracy"],
                "test_macro_f1": result.test["macro_f1"],
                "test_ece": result.test.get("ece"),
                "test_ece_uncalibrated": (result.test.get("calibration") or {})
                .get("before", {})
                .get("ece"),
                "test_log_loss": result.test.get("log_loss"),
                "leak_free_accuracy": (result.test.get("leak_free") or {}).get("accuracy"),
                "leak_free_macro_f1": (result.test.get("leak_free") or {}).get("macro_f1"),
                "gap": best["val_accuracy"] - result.test["accuracy"],
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(json.dumps(single[-1]), flush=True)

    settings = load_settings(args.files, [*base, f"train.seed={args.cv_seed}"])
    t0 = time.perf_counter()
    cv = run_cv(
        settings,
        args.folds,
        out_dir=runs / f"cv{args.folds}-s{args.cv_seed}-{time.strftime('%H%M%S')}",
        say=lambda line: print(line, flush=True),
    )
    cv_seconds = time.perf_counter() - t0
    test = cv.test or {}
    fold_test = test["per_fold"]["accuracy"]
    report = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "settings_files": args.files,
        "overrides": args.overrides,
        "single_split": {
            "runs": single,
            "val_accuracy": mean_std([r["val_accuracy"] for r in single]),
            "test_accuracy": mean_std([r["test_accuracy"] for r in single]),
            "test_macro_f1": mean_std([r["test_macro_f1"] for r in single]),
            "leak_free_accuracy": mean_std([r["leak_free_accuracy"] for r in single]),
            "test_ece": mean_std([r["test_ece"] for r in single]),
            "abs_gap": mean_std([abs(r["gap"]) for r in single]),
        },
        "cv": {
            "folds": args.folds,
            "seed": args.cv_seed,
            "run_dir": str(cv.run_dir),
            "fold_val_accuracy": cv.selection["val_accuracy"],
            "oof_accuracy": cv.oof["accuracy"],
            "oof_ece": cv.oof["ece"],
            "temperature": (cv.calibration or {}).get("temperature"),
            "test_accuracy_fold_models": fold_test,
            "test_leak_free_accuracy_fold_models": test["per_fold_leak_free"]["accuracy"],
            "test_accuracy_averaged": test["averaged_probabilities"]["accuracy"],
            "test_ece_averaged": test["averaged_probabilities"]["ece"],
            "gap_fold_val": cv.selection["val_accuracy"]["mean"] - fold_test["mean"],
            "gap_oof": cv.oof["accuracy"] - fold_test["mean"],
            "seconds": round(cv_seconds, 1),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    s, c = report["single_split"], report["cv"]
    print("| selection | signal (accuracy) | test accuracy | gap |")
    print("| --- | --- | --- | --- |")
    print(
        f"| valid split, {len(single)} seeds | {s['val_accuracy']['mean']:.3f} +- "
        f"{s['val_accuracy']['std']:.3f} | {s['test_accuracy']['mean']:.3f} +- "
        f"{s['test_accuracy']['std']:.3f} | {s['abs_gap']['mean']:.3f} (mean abs) |"
    )
    print(
        f"| {args.folds}-fold, held-out folds | {c['fold_val_accuracy']['mean']:.3f} +- "
        f"{c['fold_val_accuracy']['std']:.3f} | {fold_test['mean']:.3f} +- {fold_test['std']:.3f}"
        f" | {c['gap_fold_val']:+.3f} |"
    )
    print(
        f"| {args.folds}-fold, pooled out-of-fold | {c['oof_accuracy']:.3f} | "
        f"{fold_test['mean']:.3f} | {c['gap_oof']:+.3f} |"
    )
    print(f"averaged fold models on test: {c['test_accuracy_averaged']:.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
