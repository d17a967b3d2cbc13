"""How far are held-out folds, valid and test from the images their models trained on?

The cross-validation's selection signal (accuracy on each model's held-out fold) was 4.1 points
above the same fold models' test accuracy on the main recipe (docs/results.md). This measures
one candidate cause: distance to the training images. For every held-out image it takes the
similarity to its nearest neighbour among the images its model trained on (the other folds;
for test, the fold model's four training folds), in two feature spaces that owe nothing to the
trained models:

- `thumbnail`: 32x32 average-pooled pixels, centred and L2-normalised (cosine = correlation);
- `imagenet`: EfficientNet-Lite0's ImageNet features (the weights training starts from, not
  fine-tuned; gray repeated to 3 channels, scaled as the weights expect), globally pooled.

Then it bins the held-out images by that similarity (quartiles of the out-of-fold images), reads
accuracy per bin from the cross-validation's own predictions (oof.json and every fold's
eval-test/evaluation.json), and reweights the out-of-fold accuracy per bin by the share of test
images in that bin: if distance to the training images explains the gap, the reweighted signal
lands near the fold models' test accuracy.

    python bench/split_similarity.py --processed-dir STORE --cv outputs/cv-gap-main/cv5-s0-085513 \
        --out bench/results/split_similarity_main_cpu.json

Needs a finished `ctscan train --folds K` folder whose store is STORE (the paths must match).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctscan.data.store import load_store

BINS = 4


def thumbnails(images: torch.Tensor) -> torch.Tensor:
    x = torch.nn.functional.adaptive_avg_pool2d(images.float(), 32).flatten(1)
    x = x - x.mean(dim=1, keepdim=True)
    return torch.nn.functional.normalize(x, dim=1)


@torch.inference_mode()
def imagenet_features(images: torch.Tensor) -> torch.Tensor:
    from ctscan.models import build_model

    model = build_model("efficientnet_lite0", pretrained=True).eval()
    out = []
    for batch in images.split(64):
        x = (batch.float() / 255.0 - 0.5) / 0.5
        x = torch.nn.functional.interpolate(x, size=224, mode="bilinear", antialias=True)
        feats = model.forward_head(model.forward_features(x.repeat(1, 3, 1, 1)), pre_logits=True)
        out.append(feats)
    return torch.nn.functional.normalize(torch.cat(out), dim=1)


def read_cv(cv_dir: Path) -> tuple[dict[str, int], dict[str, bool], list[dict[str, bool]]]:
    """(fold of each pool path, out-of-fold correctness, per fold: test path -> correct)."""
    oof = json.loads((cv_dir / "oof.json").read_text())
    fold = {row["path"]: int(row["fold"]) - 1 for row in oof}
    right = {
        row["path"]: max(row["probabilities"], key=row["probabilities"].get) == row["true"]
        for row in oof
    }
    tests = []
    for k in range(1, max(fold.values()) + 2):
        rows = json.loads((cv_dir / f"fold-{k}" / "eval-test" / "evaluation.json").read_text())
        tests.append({r["path"]: r["label"] == r["true"] for r in rows["predictions"]})
    return fold, right, tests


def check_same_store(cv: Any, paths: dict[str, list[str]], image_size: int, args: Any) -> None:
    """The cross-validation must have run on this store: the same pool and the same test."""
    fold, _, tests = cv
    pool = set(paths["train"]) | set(paths["valid"])
    same_test = all(set(t) == set(paths["test"]) for t in tests)
    recorded = json.loads((args.cv / "folds.json").read_text()).get("settings", {})
    size = (recorded.get("data") or {}).get("image_size")
    if set(fold) != pool or not same_test or size != image_size:
        store = (recorded.get("paths") or {}).get("processed_dir", "another store")
        raise SystemExit(
            f"split_similarity: error: '{args.cv}' was trained on {store}, not on "
            f"{args.processed_dir} (its images or their size differ). Fix: pass --processed-dir "
            f"{store}."
        )


def nearest(feats_q: torch.Tensor, feats_ref: torch.Tensor) -> np.ndarray:
    return (feats_q @ feats_ref.T).max(dim=1).values.numpy()


def measure(space: str, feats: dict[str, torch.Tensor], paths: dict[str, list[str]], cv) -> dict:
    fold, right, tests = cv
    pool_paths = paths["train"] + paths["valid"]
    pool = torch.cat([feats["train"], feats["valid"]])
    pool_fold = np.array([fold[p] for p in pool_paths])
    k = len(tests)
    oof_sim, oof_right = np.empty(len(pool_paths)), np.empty(len(pool_paths), dtype=bool)
    test_sim, test_right = [], []
    for f in range(k):
        held, trained = pool_fold == f, pool_fold != f
        ref = pool[torch.as_tensor(trained)]
        oof_sim[held] = nearest(pool[torch.as_tensor(held)], ref)
        oof_right[held] = [right[p] for p, h in zip(pool_paths, held, strict=True) if h]
        test_sim.append(nearest(feats["test"], ref))
        test_right.append([tests[f][p] for p in paths["test"]])
    test_sim, test_right = np.concatenate(test_sim), np.concatenate(test_right)
    valid_sim = nearest(feats["valid"], feats["train"])  # the single split: valid vs train
    edges = np.quantile(oof_sim, np.linspace(0, 1, BINS + 1))
    edges[0], edges[-1] = -np.inf, np.inf
    rows = []
    for b in range(BINS):
        in_oof = (oof_sim > edges[b]) & (oof_sim <= edges[b + 1])
        in_test = (test_sim > edges[b]) & (test_sim <= edges[b + 1])
        rows.append(
            {
                "similarity": [float(oof_sim[in_oof].min()), float(oof_sim[in_oof].max())],
                "oof_share": float(in_oof.mean()),
                "test_share": float(in_test.mean()),
                "oof_accuracy": float(oof_right[in_oof].mean()),
                "test_accuracy": float(test_right[in_test].mean()) if in_test.any() else None,
            }
        )
    reweighted = sum(r["oof_accuracy"] * r["test_share"] for r in rows)
    pct = [10, 25, 50, 75, 90]
    return {
        "space": space,
        "nearest_similarity_percentiles": {
            "percentiles": pct,
            "held_out_fold_to_other_folds": np.percentile(oof_sim, pct).round(4).tolist(),
            "test_to_fold_training_sets": np.percentile(test_sim, pct).round(4).tolist(),
            "valid_to_train": np.percentile(valid_sim, pct).round(4).tolist(),
        },
        "bins_by_oof_quartile": rows,
        "oof_accuracy": float(oof_right.mean()),
        "fold_models_test_accuracy": float(test_right.mean()),
        "oof_reweighted_to_test_similarity": float(reweighted),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processed-dir", type=Path, required=True)
    parser.add_argument("--cv", type=Path, required=True, help="a `ctscan train --folds K` folder")
    parser.add_argument("--out", type=Path, default=Path("bench/results/split_similarity.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    store = load_store(args.processed_dir)
    splits = {name: store.split(name) for name in ("train", "valid", "test")}
    paths = {name: s.paths for name, s in splits.items()}
    try:
        cv = read_cv(args.cv)
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(
            f"split_similarity: error: '{args.cv}' is not a finished `ctscan train "
            f"--folds K` folder ({exc})."
        ) from None
    check_same_store(cv, paths, store.spec.image_size, args)
    results = []
    for space, embed in (("thumbnail", thumbnails), ("imagenet", imagenet_features)):
        feats = {name: embed(s.images) for name, s in splits.items()}
        results.append(measure(space, feats, paths, cv))
        r = results[-1]
        print(f"{space}: nearest-neighbour similarity (10/25/50/75/90th percentile)")
        for key, values in r["nearest_similarity_percentiles"].items():
            if key != "percentiles":
                print(f"  {key:32s} {' '.join(f'{v:.3f}' for v in values)}")
        print("  bin (oof quartile)  oof share  test share  oof acc  test acc")
        for row in r["bins_by_oof_quartile"]:
            lo, hi = row["similarity"]
            test_acc = "-" if row["test_accuracy"] is None else f"{row['test_accuracy']:.3f}"
            print(
                f"  {lo:.3f}-{hi:.3f}        {row['oof_share']:.2f}       "
                f"{row['test_share']:.2f}        {row['oof_accuracy']:.3f}    {test_acc}"
            )
        print(
            f"  out-of-fold {r['oof_accuracy']:.3f}; reweighted to test's similarity "
            f"{r['oof_reweighted_to_test_similarity']:.3f}; fold models on test "
            f"{r['fold_models_test_accuracy']:.3f}"
        )
    out = {
        "bench": "split_similarity",
        "cv": str(args.cv),
        "processed_dir": str(args.processed_dir),
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} "
        "threads".replace("  ", " "),
        "date": time.strftime("%Y-%m-%d"),
        "wall_s": round(time.perf_counter() - started, 1),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
