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

from captioner.core.errors import UserError
from captioner.core.runs import PIPELINE_SAMPLES_FILE, PIPELINE_SUMMARY_FILE

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


WARNING = re.compile(r"^\S+\.py:\d+: (\w*Warning): (.*)$")
EXECUTOR_INPUT = re.compile(r"^(\s*)\[KFP Executor [^\]]*\]: Got executor_input:\s*$")


class _LogFilter:
    """What goes into pipeline.log without -v: kfp.local's output without colour codes, each
    distinct Python warning once (kfp repeats its local-runner warnings for every task), and
    no `Got executor_input:` JSON dumps (each step's inputs are in its executor_output.json
    and, with -v, on the terminal)."""

    def __init__(self):
        self.seen: set[str] = set()
        self.skip_source_line = False
        self.dump_indent: str | None = None

    def keep(self, line: str) -> str | None:
        line = ANSI.sub("", line)
        if self.dump_indent is not None:
            if line.rstrip("\n") == self.dump_indent + "}":
                self.dump_indent = None
            return None
        if m := EXECUTOR_INPUT.match(line):
            self.dump_indent = m.group(1)
            return None
        if self.skip_source_line:
            self.skip_source_line = False
            if line.startswith("  "):
                return None
        if m := WARNING.match(line.rstrip("\n")):
            key = re.sub(r"'[^']*'", "''", m.group(2))  # the same warning about another task
            self.skip_source_line = True
            if key in self.seen:
                return None
            self.seen.add(key)
            self.skip_source_line = False
        return line


class _StepReporter(threading.Thread):
    """Reads kfp.local's output from a pipe, writes it (filtered) to the log file and prints a
    line when a step finishes or is skipped."""

    def __init__(self, read_fd: int, log_path: Path, root: Path, out):
        super().__init__(daemon=True)
        self.read_fd, self.log_path, self.root, self.out = read_fd, log_path, root, out
        self.started: dict[str, float] = {}
        self.failed: list[str] = []
        self.filter = _LogFilter()

    def run(self) -> None:
        with os.fdopen(self.read_fd, errors="replace") as src, open(self.log_path, "w") as log_f:
            for line in src:  # ends when every writer (this process's fds, the steps' subprocesses) closed
                kept = self.filter.keep(line)
                if kept is not None:
                    log_f.write(kept)
                    log_f.flush()
                    self.handle(kept)

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


def run_pipeline_here(arguments: dict, pipeline_root: str | Path, log_path: str | Path, verbose: bool = False,
                      overwrite_hint: str = ""):
    """pipeline.runner.run_local with its output in `log_path` (or on the terminal with verbose)."""
    from captioner.pipeline.runner import run_local

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
    read_fd, write_fd = os.pipe()
    reporter = _StepReporter(read_fd, log_path, root, terminal)
    reporter.start()
    os.dup2(write_fd, 1)  # kfp.local prints to stdout, its steps' subprocesses inherit both
    os.dup2(write_fd, 2)
    os.close(write_fd)
    err = None
    try:
        result = run_local(arguments, root)
    except Exception as e:  # noqa: BLE001 - reported below, with the log's tail
        err = e
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)  # closes the pipe's last writers here: the reporter sees its end
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        reporter.join(timeout=60)
    terminal.close()
    if err is not None:
        lines = [ln.rstrip() for ln in log_path.read_text(errors="replace").splitlines()]
        cause = _step_error(lines)
        if not cause:  # no exception line of a step: show the log's end
            sys.stderr.write("\n".join(lines[-25:]) + "\n")
        failed = list(dict.fromkeys(reporter.failed))
        step = f" at step {', '.join(failed)}" if failed else ""
        what = cause[1] if cause else ANSI.sub('', str(err)).splitlines()[0]
        hint = f"the full output of every step is in {log_path} (or rerun with -v)"
        if cause and cause[0] == "RunExists" and overwrite_hint:
            hint = f"{overwrite_hint}; {hint}"
        raise UserError(f"pipeline failed{step}: {what[:400]}", hint=hint) from err
    log.info("pipeline finished in %.0fs; every step's output is in %s", time.monotonic() - t0, log_path)
    return result


STEP_ERROR = re.compile(r"^\s*(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exists|Exception|Interrupted)): (.+)$")


def _step_error(lines: list[str]) -> tuple[str, str] | None:
    """(exception class, message) of the last exception a step raised, from its traceback's
    last line in the log (kfp.local's own RuntimeError that wraps it comes after: skipped)."""
    for ln in reversed(lines):
        m = STEP_ERROR.match(ln)
        if m and "finished with status" not in ln and not m.group(2).startswith("Task "):
            return m.group(1), m.group(2).strip()
    return None


# ----------------------------------------------------------------------------- results you can find


def _latest_run(root: Path) -> Path | None:
    runs = [d for d in Path(root).iterdir() if d.is_dir()] if Path(root).is_dir() else []
    return max(runs, key=lambda d: d.stat().st_mtime) if runs else None


def _executor_output(run: Path, task: str) -> dict | None:
    p = run / task / "executor_output.json"
    return json.loads(p.read_text()) if p.exists() else None


def _artifact_metadata(out: dict | None, name: str) -> dict:
    arts = ((out or {}).get("artifacts", {}).get(name, {}) or {}).get("artifacts", [])
    return dict(arts[0].get("metadata", {})) if arts else {}


def _param(out: dict | None, name: str = "Output"):
    return (out or {}).get("parameterValues", {}).get(name)


def deploy_decision(cider: float | None, min_cider: float, champion: float | None, deployed: dict | None) -> dict:
    """Whether the new model was deployed, and why (the gate: CIDEr-D >= --min-cider and >= the
    deployed champion's)."""
    if deployed:
        return {"deployed": True, "version": deployed.get("version"), "serving_uri": deployed.get("serving_uri"),
                "reason": f"CIDEr-D {cider:.4g} passed the gate (>= {min_cider:g} and >= the deployed model's "
                          f"{champion:.4g})" if cider is not None and champion is not None and champion >= 0
                          else f"CIDEr-D {cider} passed the gate (>= {min_cider:g}; nothing was deployed before)"}
    if cider is None:
        return {"deployed": False, "reason": "the pipeline stopped before the quality gate"}
    if cider < min_cider:
        why = f"CIDEr-D {cider:.4g} is below --min-cider {min_cider:g}"
    elif champion is not None and cider < champion:
        why = f"CIDEr-D {cider:.4g} is below the deployed model's {champion:.4g}"
    else:
        why = "the deploy step did not run"
    return {"deployed": False, "reason": why}


def write_summary(workdir: str | Path, pipeline_root: str | Path, arguments: dict, extra: dict | None = None) -> dict:
    """WORKDIR/summary.json: one file with what a run produced (dataset, metrics, export parity,
    deploy decision, where everything is), and WORKDIR/samples.html (the evaluate step's page,
    worst captions first) copied next to it; paths are relative to WORKDIR where they are inside it."""
    wd = Path(workdir).resolve()
    run = _latest_run(Path(pipeline_root))
    if run is None:
        raise UserError(f"no pipeline run under {pipeline_root}")
    out = {t: _executor_output(run, t) for t in ("ingest", "train", "evaluate", "export", "champion", "gate",
                                                 "deploy")}
    ev = _artifact_metadata(out["evaluate"], "metrics")
    cider = _param(out["evaluate"], "cider")
    champion = _param(out["champion"])
    deployed = json.loads(_param(out["deploy"])) if _param(out["deploy"]) else None
    samples = next(iter(sorted((run / "evaluate").glob("samples*.html"))), None) if (run / "evaluate").is_dir() else None
    report = None
    if samples is not None:
        import shutil

        shutil.copyfile(samples, wd / PIPELINE_SAMPLES_FILE)
        report = PIPELINE_SAMPLES_FILE

    def rel(p):
        if not p:
            return p
        try:
            return str(Path(p).resolve().relative_to(wd))
        except ValueError:
            return str(p)

    exp = _artifact_metadata(out["export"], "repository")
    summary = {
        "pipeline_run": run.name,
        "dataset": {k: v for k, v in _artifact_metadata(out["ingest"], "dataset").items() if k != "manifest"}
        | {"uri": rel(arguments.get("data_uri"))},
        "model": {"checkpoint": rel(_artifact_metadata(out["train"], "model").get("checkpoint")),
                  "config": arguments.get("config"), "overrides": list(arguments.get("overrides", []))},
        "metrics": {k: v for k, v in ev.items() if k != "images"},
        "evaluated_images": int(ev["images"]) if "images" in ev else None,
        "report": report,
        "run_report": rel(next(iter(sorted(run.glob("evaluate/**/report*.html"))), None)),
        "export": {"repository": rel(exp.get("repo_uri")),
                   "parity": {k[len("parity_"):]: v for k, v in exp.items() if k.startswith("parity_")}},
        "deploy": deploy_decision(cider, float(arguments.get("min_cider", 0.0)), champion, deployed),
        "log": "pipeline.log",
        "pipeline_root": rel(pipeline_root),
    }
    summary.update(extra or {})
    (wd / PIPELINE_SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    summary["_path"] = str(wd / PIPELINE_SUMMARY_FILE)
    return summary


def print_outcome(summary: dict) -> None:
    """The deploy decision and where the results are, after the per-step lines."""
    d = summary["deploy"]
    print(("deployed: " if d["deployed"] else "not deployed: ") + d["reason"])
    wd = Path(summary["_path"]).parent
    where = f"results: {summary['_path']}"
    if summary.get("report"):
        where += f"; captions, worst first: {wd / summary['report']}"
    print(where, flush=True)
