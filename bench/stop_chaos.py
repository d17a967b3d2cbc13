"""Stop real `ctscan` processes at random moments, continue them as told, and count what broke.

    python bench/stop_chaos.py [--launches 36] [--seed 0] [--out bench/results/stop_chaos.json]

Each launch runs `python -m ctscan` (this checkout's src/) as a user would: `preprocess`,
`train`, `train --folds 2` or `sweep`, on a tiny synthetic raw tree (32 px, cnn_gap, 3 epochs,
MLflow on a SQLite store in a temp folder), and stops it after a random delay (seeded) with
SIGINT (to the process group, as a terminal's Ctrl-C), SIGTERM, SIGKILL, or two signals close
together. The continue is the command the stop line names (after SIGKILL, where there is no
line: the same command; for train, `--resume auto` once a last.pt exists), run to its end.
Counted per launch, each a defect where it should be 0:
- exit: a stop that was not exit 130 (first signal INT) / 143 (TERM) with exactly one stop line;
- traceback: "Traceback" in the stopped or the continuing process's stderr;
- continue: the continue did not exit 0;
- running: MLflow runs left RUNNING after the continue (after SIGKILL: listed, not a defect: a
  kill before the run is recorded is documented to leave one);
- broken: a store or run folder that does not load, or a temp/lock/old-store file left behind
  (after SIGKILL a lock file nobody holds is listed, not a defect: its flock died with it);
- weights: the continued run's (or each fold's) last.pt and best.pt weights not torch.equal to
  an uninterrupted run's with the same settings; the continued store's files not the same bytes;
- sweep: the study does not hold exactly the asked finished trials, holds a RUNNING trial or
  two finished trials with the same parameters (one trial run twice);
- orphans: a process of the launch's group still alive after it ended.
A stop that lands after the work is done (during the interpreter's exit) can end the process by
the signal (exit -15, no line): counted as `late`, not a defect, when the output is complete.
Prints a table; writes bench/results/stop_chaos.json (counts per command and stop, defects
with their stderr tail, the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_facts

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("preprocess", "train", "train --folds", "sweep")
STOPS = ("INT", "TERM", "KILL", "INT+INT", "TERM+TERM", "TERM+INT", "INT+TERM")
WEIGHTS = {"preprocess": 2, "train": 4, "train --folds": 2, "sweep": 2}  # launches drawn
FOLDS, TRIALS, EPOCHS = 2, 3, 3
OUT = {"preprocess": "processed", "train": "run", "train --folds": "cv", "sweep": "."}
FINISHED = {"train": "run/result.json", "train --folds": "cv/cv.json"}  # what a finished job left
STOP_LINE = re.compile(r"^ctscan: (interrupted|terminated): (.*)$", re.M)
CLASSES = ("adenocarcinoma", "large.cell.carcinoma", "normal", "squamous.cell.carcinoma")


def write_raw_tree(raw: Path, per_class: dict[str, int], side: int = 96) -> None:
    """A Kaggle-layout raw tree of PNGs: class k is a bright square in quadrant k over noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for label, name in enumerate(CLASSES):
            folder = raw / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (side, side), dtype=np.uint8)
                r, c = divmod(label, 2)
                top, left = r * side // 2 + rng.integers(0, 8), c * side // 2 + rng.integers(0, 8)
                img[top : top + side // 4, left : left + side // 4] = 220
                Image.fromarray(img).save(folder / f"{i}.png")


SETTINGS = """\
[paths]
raw_dir = "{raw}"
processed_dir = "{store}"
runs_dir = "{work}/runs"
[data]
image_size = 32
[model]
name = "cnn_gap"
pretrained = false
[train]
device = "cpu"
epochs = {epochs}
batch_size = 16
lr = 0.003
warmup_epochs = 0
threads = 1
quiet = true
[tracking]
enabled = true
uri = "sqlite:///{work}/mlflow.db"
log_model = false
"""

SWEEP = """\
[sweep]
metric = "val_macro_f1"
sampler = "tpe"
seed = 0
trials = {trials}
settings = ["{settings}"]
pruning = false
tpe_startup_trials = 2
heartbeat_interval = 1
grace_period = 2
[fixed]
"train.epochs" = 1
[params."train.lr"]
low = 1e-3
high = 1e-2
log = true
"""


class Workspace:
    """The temp folder: raw tree, settings, sweep spec, the shared MLflow store, references."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.raw, self.store = root / "raw", root / "ref" / "preprocess" / OUT["preprocess"]
        self.settings, self.spec = root / "settings.toml", root / "chaos.toml"
        self.uri = f"sqlite:///{root}/mlflow.db"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("CTSCAN_", "MLFLOW_"))}
        self.env.update(PYTHONPATH=str(ROOT / "src"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.seconds: dict[str, float] = {}
        self.latest = 1.05  # the latest stop, in times an uninterrupted run's time

    def build(self) -> None:
        write_raw_tree(self.raw, {"train": 24, "valid": 6, "test": 6})
        self.settings.write_text(
            SETTINGS.format(raw=self.raw, store=self.store, work=self.root, epochs=EPOCHS)
        )
        self.spec.write_text(SWEEP.format(trials=TRIALS, settings=self.settings))

    def args(self, command: str, folder: Path, name: str) -> list[str]:
        """`command`'s ctscan arguments, writing under `folder`, tracked as experiment `name`."""
        tracked = ["--set", f'tracking.experiment="{name}"']
        out = str(folder / OUT[command])
        if command == "preprocess":
            return ["preprocess", "-s", str(self.settings), "--out", out, "--quiet"]
        if command == "train":
            return ["train", "-s", str(self.settings), "--out", out, *tracked]
        if command == "train --folds":
            return [
                "train",
                "--folds",
                str(FOLDS),
                "-s",
                str(self.settings),
                "--out",
                out,
                *tracked,
            ]
        return [
            "sweep", str(self.spec), "--name", name, "--set", f'paths.runs_dir="{folder}"',
            *tracked,
        ]  # fmt: skip

    def popen(self, args: list[str]) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "ctscan", *args],
            cwd=self.root,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: a Ctrl-C reaches only this launch
        )

    def run(self, args: list[str], timeout: float = 900) -> tuple[int, str, str, float]:
        t0 = time.perf_counter()
        proc = self.popen(args)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            err += "\n[stop_chaos: hung, killed]"
        return proc.returncode, out, err, time.perf_counter() - t0


def _send(pid: int, name: str) -> None:
    """INT to the group (a terminal's Ctrl-C reaches all of it); TERM and KILL to the process."""
    sig = getattr(signal, f"SIG{name}")
    with contextlib.suppress(ProcessLookupError):
        if sig == signal.SIGINT:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _orphans(pgid: int, wait: float = 5.0) -> bool:
    """Whether a process of group `pgid` is still alive `wait` s after its leader ended."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    return True


def _continue_args(ws: Workspace, command: str, folder: Path, first: list[str], line: str) -> list:
    """The continue the stop line names (`ctscan ...` in backticks, plus its `(-s FILE)`); with
    no command in it (or no line: SIGKILL), the same command, or `--resume auto` for a run with
    a last.pt."""
    named = re.search(r"`ctscan ([^`]*)`", line)
    if named:
        args = shlex.split(named.group(1))
        settings = re.search(r"\(-s ([^)]*)\)", line)
        return args + (["-s", settings.group(1)] if settings else [])
    run = folder / OUT[command]
    if not line and command == "train" and (run / "last.pt").is_file():
        return ["train", "--resume", "auto", "--out", str(run), "-s", str(run / "settings.toml")]
    return first


def _left_behind(folder: Path) -> list[str]:
    """Temp files, lock files and old-store folders left anywhere under `folder`."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.name.endswith(".tmp") or p.name == ".lock" or ".old-" in p.name
    )


def _held(lock: Path) -> bool:
    """Whether a process holds the flock on `lock` (a lock file a SIGKILL left is not held)."""
    import fcntl

    with lock.open() as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return False


def _same_weights(a: Path, b: Path) -> str | None:
    """Why checkpoint `a`'s weights differ from `b`'s (None: torch.equal, every tensor)."""
    import torch

    from ctscan.engine.checkpoint import read_checkpoint

    try:
        left, right = read_checkpoint(a).model_state, read_checkpoint(b).model_state
    except Exception as exc:  # a broken checkpoint: its own defect
        return f"{a.name}: {exc}"
    if left.keys() != right.keys():
        return f"{a}: other tensors than {b}"
    bad = [k for k in left if not torch.equal(left[k], right[k])]
    return f"{a}: {len(bad)} tensors differ ({bad[0]})" if bad else None


def _store_files(store: Path) -> dict[str, str]:
    from ctscan.data.store import load_store

    return {k: v["sha256"] for k, v in load_store(store, verify=True).meta["files"].items()}


def _mlflow_runs(uri: str, experiment: str) -> Counter:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return Counter()
    runs = client.search_runs([found.experiment_id], run_view_type=3, max_results=1000)
    return Counter(r.info.status for r in runs)


def _study(folder: Path, name: str) -> dict[str, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder}/optuna.db")
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    params = [json.dumps(t.params, sort_keys=True) for t in finished]
    return {
        "states": dict(Counter(t.state.name for t in trials)),
        "finished": len(finished),
        "same_params": len(params) - len(set(params)),
    }


def check(ws: Workspace, refs: dict[str, Path], command: str, folder: Path, name: str) -> dict:
    """What the continued launch left: {defect kind: detail} for each defect, plus facts."""
    bad: dict[str, str] = {}
    out, ref = folder / OUT[command], refs[command]
    left = _left_behind(folder)
    stale = [p for p in left if p.endswith(".lock") and not _held(folder / p)]
    if set(left) - set(stale):
        bad["broken"] = f"left behind: {left}"
    try:
        if command == "preprocess":
            if _store_files(out) != _store_files(ref):
                bad["weights"] = "the store's files differ from an uninterrupted preprocess's"
        elif command == "train":
            for file in ("last.pt", "best.pt"):
                why = _same_weights(out / file, ref / file)
                if why:
                    bad["weights"] = why
        elif command == "train --folds":
            if not (out / "folds.json").is_file():
                bad["broken"] = "no folds.json"
            for k in range(1, FOLDS + 1):
                for file in ("last.pt", "best.pt"):
                    fold = f"fold-{k}/{file}"
                    why = _same_weights(out / fold, ref / fold)
                    if why:
                        bad["weights"] = why
        else:
            study = _study(folder, name)
            if study["finished"] != TRIALS or study["same_params"]:
                bad["sweep"] = f"{study}: asked {TRIALS} finished trials, each once"
            if study["states"].get("RUNNING"):
                bad["sweep"] = f"{study}: a trial left RUNNING"
            if not (folder / "sweeps" / name / "best.toml").is_file():
                bad["broken"] = "no best.toml recipe"
    except Exception as exc:
        bad["broken"] = f"{type(exc).__name__}: {exc}"
    runs = _mlflow_runs(ws.uri, name) if command != "preprocess" else Counter()
    if runs.get("RUNNING"):
        bad["running"] = f"MLflow runs: {dict(runs)}"
    return {"bad": bad, "mlflow_runs": dict(runs), "stale_locks": stale}


def references(ws: Workspace) -> dict[str, Path]:
    """Each command run once, uninterrupted: its outputs and its time (the stop delays' range)."""
    refs = {}
    for command in COMMANDS:
        folder = ws.root / "ref" / command.replace(" --", "-")
        args = ws.args(command, folder, f"ref-{command.replace(' --', '-')}")
        code, _, err, seconds = ws.run(args)
        if code:
            sys.exit(f"reference `{shlex.join(args)}` failed ({code}):\n{err[-3000:]}")
        refs[command], ws.seconds[command] = folder / OUT[command], seconds
        print(f"reference {command}: {seconds:.1f} s", file=sys.stderr)
    return refs


def launch(ws: Workspace, refs: dict, i: int, command: str, stop: str, rng: random.Random) -> dict:
    """One launch: start, stop after a random delay, continue, check."""
    name = f"chaos-{i:02d}"
    folder = ws.root / name
    args = ws.args(command, folder, name)
    delay = rng.uniform(0.2, ws.seconds[command] * ws.latest)
    gap = rng.uniform(0.0, 0.5)
    signals = stop.split("+")
    proc = ws.popen(args)
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < delay:
        time.sleep(0.02)
    _send(proc.pid, signals[0])
    if len(signals) > 1:
        time.sleep(gap)
        _send(proc.pid, signals[1])
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += "\n[stop_chaos: the stopped process hung, killed]"
    code = proc.returncode
    row: dict[str, Any] = {
        "launch": i, "command": command, "stop": stop, "delay_s": round(delay, 2),
        "gap_s": round(gap, 2) if len(signals) > 1 else None, "exit": code,
    }  # fmt: skip
    bad: dict[str, str] = {}
    lines = STOP_LINE.findall(err)
    first = signals[0]
    done = {
        "preprocess": "store written" in err,
        "sweep": "best.toml" in out,
    }.get(command, out.rstrip().endswith("}"))
    if code == 0:
        row["outcome"] = "finished first"
    elif first == "KILL":
        row["outcome"] = "killed" if code == -9 else "other"
    elif code == -getattr(signal, f"SIG{first}") and not lines and done:
        row["outcome"] = "late"
    else:
        row["outcome"] = "stopped"
        want = {"INT": 130, "TERM": 143}[first]
        if code != want or len(lines) != 1:
            bad["exit"] = f"exit {code} (want {want}) with {len(lines)} stop lines"
    if "Traceback" in err:
        bad["traceback"] = "in the stopped process"
    if _orphans(proc.pid):
        bad["orphans"] = "a process of the stopped launch outlived it"
    line = lines[0][1] if lines else ""
    row["line"] = line
    if command == "sweep" and first == "KILL":
        time.sleep(3)  # past the spec's grace_period: the killed trial's heartbeat is stale
    again = _continue_args(ws, command, folder, args, line)
    row["continue"] = shlex.join(["ctscan", *again])
    code2, err2 = None, ""
    if (folder / FINISHED.get(command, "-")).is_file():
        row["continue"] = None  # it ended before the stop: a rerun is refused (a finished run)
    else:
        code2, _, err2, _ = ws.run(again)
    row["continue_exit"] = code2
    if code2:
        bad["continue"] = f"exit {code2}"
    if "Traceback" in err2:
        bad["traceback"] = "in the continue"
    facts = check(ws, refs, command, folder, name)
    row["mlflow_runs"] = facts["mlflow_runs"]
    if first == "KILL" and "running" in facts["bad"]:
        row["documented"] = facts["bad"].pop("running")
    if facts["stale_locks"] and first == "KILL":  # their flock went with the killed process
        row["documented"] = f"lock files left, not held: {facts['stale_locks']}"
    elif facts["stale_locks"]:
        bad["broken"] = f"lock files left: {facts['stale_locks']}"
    bad.update(facts["bad"])
    row["defects"] = bad
    if bad:
        row["stderr_tail"] = err[-2500:]
        row["continue_stderr_tail"] = err2[-2500:]
    return row


def table(rows: list[dict]) -> list[dict]:
    """Counts per command and stop: launches, outcomes, defects per kind."""
    counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for row in rows:
        c = counts[row["command"], row["stop"]]
        c["launches"] += 1
        c[row["outcome"]] += 1
        c["documented"] += "documented" in row
        for kind in row["defects"]:
            c[kind] += 1
    return [{"command": k[0], "stop": k[1], **v} for k, v in sorted(counts.items())]


KINDS = ("exit", "traceback", "continue", "running", "broken", "weights", "sweep", "orphans")


def render(summary: list[dict]) -> str:
    head = ["command", "stop", "launches", "stopped", "killed", "late", "finished first"]
    head += [*KINDS, "documented"]
    lines = [" | ".join(head)]
    for s in summary:
        lines.append(" | ".join(str(s.get(h, 0)) for h in head))
    return "\n".join(lines)


def _lscpu_model() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for row in out.splitlines():
            if row.startswith("Model name:"):
                return row.split(":", 1)[1].strip()
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=36)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/stop_chaos.json")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    parser.add_argument(
        "--latest", type=float, default=1.05, help="latest stop / an uninterrupted run's time"
    )
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    plan = [
        (rng.choices(COMMANDS, [WEIGHTS[c] for c in COMMANDS])[0], rng.choice(STOPS))
        for _ in range(args.launches)
    ]
    root = Path(tempfile.mkdtemp(prefix="ctscan-chaos-"))
    ws = Workspace(root)
    ws.latest = args.latest
    ws.build()
    refs = references(ws)
    rows: list[dict] = []
    t0 = time.perf_counter()
    for i, (command, stop) in enumerate(plan):
        row = launch(ws, refs, i, command, stop, rng)
        rows.append(row)
        print(
            f"[{i + 1}/{len(plan)}] {command} {stop} at {row['delay_s']} s: {row['outcome']} "
            f"exit {row['exit']}, continue {row['continue_exit']}"
            + (f"; DEFECTS {row['defects']}" if row["defects"] else ""),
            file=sys.stderr,
        )
        write(args, ws, rows, time.perf_counter() - t0)  # a cut-short run keeps what it found
    print(render(table(rows)))
    print(f"wrote {args.out}" + ("" if not args.keep else f"; temp folder {root}"))
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 1 if any(r["defects"] for r in rows) else 0


def write(args: argparse.Namespace, ws: Workspace, rows: list[dict], seconds: float) -> None:
    """The results so far as JSON to `args.out`."""
    summary = table(rows)
    facts = cpu_facts()
    result = {
        "machine": {
            **facts,
            "lscpu_model_name": _lscpu_model(),
            "avx512_vnni": "avx512_vnni" in facts["flags"],
        },
        "commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        "settings": {
            "launches": args.launches,
            "done": len(rows),
            "seed": args.seed,
            "latest": ws.latest,
            "epochs": EPOCHS,
            "folds": FOLDS,
            "trials": TRIALS,
            "reference_seconds": {k: round(v, 1) for k, v in ws.seconds.items()},
        },
        "seconds": round(seconds, 1),
        "totals": {k: sum(s.get(k, 0) for s in summary) for k in (*KINDS, "documented")},
        "counts": summary,
        "defects": [r for r in rows if r["defects"]],
        "launches": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
