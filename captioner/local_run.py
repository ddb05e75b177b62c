"""Running the pipeline on this machine without drowning the user: kfp.local prints every
step's inputs, outputs and streamed logs (hundreds of lines, with colour codes). Here all of
that goes to a log file and the terminal gets one line per step, with its duration and
outputs; `-v` shows everything as kfp.local prints it."""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

from captioner.errors import UserError

log = logging.getLogger(__name__)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
STARTED = re.compile(r"Executing task '([^']+)'")
FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
SKIPPED = re.compile(r"Skipping task (\S+?):")


def _outputs(root: Path, task: str) -> str:
    """`name=value` for a finished step's parameters and artifact URIs (from executor_output.json)."""
    runs = sorted(root.glob(f"*/{task}/executor_output.json"), key=lambda p: p.stat().st_mtime)
    if not runs:
        return ""
    out = json.loads(runs[-1].read_text())
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    parts = [f"{k}={fmt(v)}" for k, v in out.get("parameterValues", {}).items()]
    for k, arts in out.get("artifacts", {}).items():
        for a in arts.get("artifacts", []):
            md = a.get("metadata", {})
            shown = ", ".join(f"{mk} {fmt(mv)}" for mk, mv in list(md.items())[:6]
                              if mv is not None and not isinstance(mv, (dict, list)))
            parts.append(f"{k}: {shown or a.get('uri', '')}")
    text = "; ".join(parts)
    return text if len(text) <= 300 else text[:297] + "..."


class _StepReporter(threading.Thread):
    """Follows the log file and prints a line when a step finishes or is skipped."""

    def __init__(self, log_path: Path, root: Path, out):
        super().__init__(daemon=True)
        self.log_path, self.root, self.out = log_path, root, out
        self.stop = threading.Event()
        self.started: dict[str, float] = {}
        self.failed: list[str] = []

    def run(self) -> None:
        with open(self.log_path, errors="replace") as f:
            while True:
                line = f.readline()
                if not line:
                    if self.stop.is_set():
                        return
                    time.sleep(0.1)
                    continue
                self.handle(ANSI.sub("", line))

    def handle(self, line: str) -> None:
        if m := STARTED.search(line):
            self.started[m.group(1)] = time.monotonic()
        elif m := FINISHED.search(line):
            task, status = m.groups()
            took = time.monotonic() - self.started.get(task, time.monotonic())
            if status != "SUCCESS":
                self.failed.append(task)
            outs = _outputs(self.root, task) if status == "SUCCESS" else ""
            self.say(f"  {task:<12} {status.lower():<8} {took:6.1f}s  {outs}".rstrip())
        elif m := SKIPPED.search(line):
            self.say(f"  {m.group(1).strip(chr(39)):<12} skipped")

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


def run_pipeline_here(arguments: dict, pipeline_root: str | Path, log_path: str | Path, verbose: bool = False):
    """kfp_pipeline.run_local with its output in `log_path` (or on the terminal with verbose)."""
    from captioner.kfp_pipeline import run_local

    root = Path(pipeline_root)
    if verbose:
        return run_local(arguments, root)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved_out), "w")
    t0 = time.monotonic()
    with open(log_path, "w") as logf:
        os.dup2(logf.fileno(), 1)  # kfp.local prints to stdout, its steps' subprocesses inherit both
        os.dup2(logf.fileno(), 2)
        reporter = _StepReporter(log_path, root, terminal)
        reporter.start()
        err = None
        try:
            result = run_local(arguments, root)
        except Exception as e:  # noqa: BLE001 - reported below, with the log's tail
            err = e
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            reporter.stop.set()
            reporter.join()
    terminal.close()
    if err is not None:
        tail = [ANSI.sub("", ln.rstrip()) for ln in log_path.read_text(errors="replace").splitlines()[-25:]]
        sys.stderr.write("\n".join(tail) + "\n")
        step = f" at step {', '.join(reporter.failed)}" if reporter.failed else ""
        raise UserError(f"pipeline failed{step}: {ANSI.sub('', str(err)).splitlines()[0][:300]}",
                        hint=f"the full output of every step is in {log_path} (or rerun with -v)") from err
    log.info("pipeline finished in %.0fs; every step's output is in %s", time.monotonic() - t0, log_path)
    return result
