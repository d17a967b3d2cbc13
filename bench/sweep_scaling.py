"""Trials/hour of `ctscan sweep` in one process against two processes sharing one study.

    python bench/sweep_scaling.py [--store outputs/processed-smoke] [--trials 4]

Both rows run the cpu-smoke spec (settings/sweeps/cpu-smoke.toml: cnn_gap, 64 px, 2 epochs per
trial, MLflow on) with its study (`--storage`) and its MLflow store (`tracking.uri`) in one
throwaway PostgreSQL server (tests/unit/conftest_postgres.py), a new database pair per row. Row 1:
one `ctscan sweep` process with all cores. Row 2: two processes started together that join one
study, each with half the cores (`--set train.threads=...`). Trials/hour = finished trials of the
study / wall time from the first start to the last exit. The load average before and after is
recorded (the machine may be shared). Prints a table, writes bench/results/sweep_scaling_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.unit.conftest_postgres import throwaway_postgres  # noqa: E402


def run_row(processes: int, create: object, store: Path, trials: int, work: Path) -> dict:
    """Start `processes` sweeps on one new study; wait for all; count and time its trials."""
    import optuna

    name = f"p{processes}"
    study_url, mlflow_url = create(f"optuna_{name}"), create(f"mlflow_{name}")  # type: ignore[operator]
    threads = max(1, (os.cpu_count() or 1) // processes)
    spec = ROOT / "settings/sweeps/cpu-smoke.toml"  # by path: the sweeps run in `work`
    command = [sys.executable, "-m", "ctscan", "sweep", str(spec), "--trials", str(trials)]
    command += ["--storage", study_url, "--set", f"tracking.uri={mlflow_url}"]
    command += ["--set", f"paths.processed_dir={store}", "--set", f"paths.runs_dir={work / name}"]
    command += ["--set", f"train.threads={threads}", "--set", "train.quiet=true"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTSCAN_", "MLFLOW_"))}
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    procs = []
    for index in range(processes):
        log = (work / f"{name}-{index}.log").open("w")
        procs.append(  # cwd: MLflow's default artifact root ./mlruns lands in `work`
            subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)
        )
    codes = [proc.wait() for proc in procs]
    wall = time.perf_counter() - t0
    if any(codes):
        raise SystemExit(f"a sweep failed ({codes}): see {work}/{name}-*.log")
    study = optuna.load_study(study_name="cpu-smoke", storage=study_url)
    states = [t.state.name for t in study.trials]
    finished = sum(state in ("COMPLETE", "PRUNED") for state in states)
    return {
        "processes": processes,
        "threads_per_process": threads,
        "trials_finished": finished,
        "states": states,
        "wall_s": round(wall, 1),
        "trials_per_hour": round(3600 * finished / wall, 1),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=ROOT / "outputs" / "processed-smoke")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/sweep_scaling_cpu.json")
    args = parser.parse_args()
    if not (args.store / "meta.json").is_file():
        raise SystemExit(f"no 64 px store at {args.store}: run `ctscan preprocess -s cpu-smoke`")
    import optuna

    rows = []
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as work, throwaway_postgres() as create:
        for processes in (1, 2):
            rows.append(run_row(processes, create, args.store.resolve(), args.trials, Path(work)))
    cpu = platform.processor() or platform.machine()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    isa = "avx512_vnni" if "avx512_vnni" in flags else "avx2" if "avx2" in flags else "other"
    result = {
        "bench": "sweep_scaling",
        "spec": "settings/sweeps/cpu-smoke.toml",
        "storage": "PostgreSQL 15 (throwaway, local), study and MLflow store",
        "cpu": cpu,
        "isa": isa,
        "cores": os.cpu_count(),
        "optuna": optuna.__version__,
        "python": platform.python_version(),
        "rows": rows,
        "speedup_2_vs_1": round(rows[1]["trials_per_hour"] / rows[0]["trials_per_hour"], 2),
    }
    print(f"{'processes':>9} {'threads':>7} {'trials':>6} {'wall s':>7} {'trials/h':>8}  load")
    for row in rows:
        print(
            f"{row['processes']:>9} {row['threads_per_process']:>7} {row['trials_finished']:>6} "
            f"{row['wall_s']:>7} {row['trials_per_hour']:>8}  "
            f"{row['load_before'][0]} -> {row['load_after'][0]}"
        )
    print(f"2 processes / 1 process: {result['speedup_2_vs_1']}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
