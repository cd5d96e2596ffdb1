"""Run every benchmark in sequence and write docs/benchmarks.md (operator section first).

    .venv/bin/python bench/run_all.py        # what `make bench` runs
    .venv/bin/python bench/run_all.py --envelope   # also bench_envelope.py (up to 30 min; not in CI)

Each script runs as a subprocess with this interpreter; its markdown table is what it prints on
stdout (progress goes to stderr, which is passed through). A script that fails is reported in
its section of the document, and the exit code is then 1.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
DOC = REPO / "docs" / "benchmarks.md"
FUNCTIONS_DOC = REPO / "docs" / "benchmarks-functions.md"

HAPROXY_HEADING = "## HAProxy runtime API adapter"
FUNCTIONS_HEADING = "## Handler functions"
OPERATOR_HEADING = "## Operator end to end"
LIFECYCLE_HEADING = "## Lifecycle handlers end to end"
ROLLOUT_HEADING = "## Rollouts on a real node"
SIDEBYSIDE_HEADING = "## Side by side: poolkeeper, the EndpointSlice controller, a bare watch and a poller"
ENVELOPE_HEADING = "## The envelope: one replica in a big cluster"


def haproxy_section(table: str) -> str:
    """bench_haproxy.py prints a caption and a table, without a heading: give it one."""
    return "\n".join([
        HAPROXY_HEADING, "",
        "`bench/bench_haproxy.py`: the cost of one call of the HAProxy adapter against a real HAProxy.", "",
        table.strip(), "",
    ])


def functions_section(table: str) -> str:
    """bench_functions.py prints its own `## Handler functions` section."""
    text = table.strip()
    if not text.startswith("## "):
        text = f"{FUNCTIONS_HEADING}\n\n{text}"
    return text + "\n"


def failed_section(heading: str, script: str, code: int, stderr_tail: str) -> str:
    tail = "\n".join(f"    {line}" for line in stderr_tail.strip().splitlines()[-15:])
    return f"{heading}\n\n**Not measured: `{script}` failed with exit code {code}.** Last lines of its output:\n\n" \
           f"{tail}\n"


def section_of(document: str, heading: str) -> str | None:
    """The `## heading` section of a markdown document (up to the next `## `), or None."""
    lines = document.splitlines()
    for start, line in enumerate(lines):
        if line.startswith(heading):
            end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
            return "\n".join(lines[start:end]).strip() + "\n"
    return None


def replace_section(document: str, heading: str, section: str) -> str:
    """`document` with its `heading` section replaced by `section` (when missing: added before the lifecycle
    section, where compose_document puts it, or at the end)."""
    current = section_of(document, heading)
    if current is None:
        following = section_of(document, LIFECYCLE_HEADING)
        if following is not None:
            return document.replace(following.strip(), f"{section.strip()}\n\n{following.strip()}", 1)
        return document.rstrip("\n") + "\n\n" + section.strip() + "\n"
    return document.replace(current.strip(), section.strip(), 1)


def compose_document(operator: str, haproxy: str, functions: str, lifecycle: str = "", rollout: str = "",
                     sidebyside: str = "", envelope: str = "") -> str:
    """docs/benchmarks.md: how to run, then the operator, HAProxy and handler-function sections."""
    return "\n".join([
        "# Benchmarks", "",
        "Numbers measured on a development machine by `make bench` "
        "(`.venv/bin/python bench/run_all.py`), which runs `bench/bench_haproxy.py`, "
        "`bench/bench_functions.py`, `bench/bench_operator.py`, `bench/bench_sidebyside.py`, "
        "`bench/bench_lifecycle.py` and "
        "`bench/bench_rollout.py` in sequence "
        "and rewrites this file. "
        "Each script can also be run on its own; `bench_operator.py` starts and stops its own "
        "control plane (etcd, kube-apiserver, kube-controller-manager), HAProxy and operator.", "",
        operator.strip(), "",
        sidebyside.strip(), "",
        lifecycle.strip(), "",
        rollout.strip(), "",
        haproxy.strip(), "",
        functions.strip(), "",
        *([envelope.strip(), ""] if envelope.strip() else []),
    ])


def run_script(script: str, args: Sequence[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr tail) of one benchmark; stderr is also echoed as it comes."""
    started = time.monotonic()
    print(f"== {script} {' '.join(args)}", file=sys.stderr, flush=True)
    proc = subprocess.Popen([sys.executable, str(BENCH / script), *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    tail: list[str] = []
    assert proc.stderr is not None and proc.stdout is not None
    stdout = proc.stdout
    captured: list[str] = []
    reader = threading.Thread(target=lambda: captured.append(stdout.read()), daemon=True)
    reader.start()  # stdout (the table) is read on the side, so neither pipe can fill up and block
    for line in proc.stderr:  # progress, shown while it runs
        sys.stderr.write(line)
        sys.stderr.flush()
        tail = [*tail[-40:], line.rstrip("\n")]
    code = proc.wait()
    reader.join()
    out = "".join(captured)
    print(f"== {script}: exit {code} after {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return code, out, "\n".join(tail)


def main() -> int:
    failures = []
    with tempfile.TemporaryDirectory(prefix="pk-bench-") as scratch:
        # bench_functions.py writes its table to --out as well: keep that copy out of docs/.
        code, out, err = run_script("bench_haproxy.py", [])
        haproxy = haproxy_section(out) if code == 0 else failed_section(HAPROXY_HEADING, "bench_haproxy.py", code,
                                                                        err)
        if code:
            failures.append("bench_haproxy.py")
        code, out, err = run_script("bench_functions.py", ["--out", str(Path(scratch) / "functions.md")])
        functions = functions_section(out) if code == 0 else failed_section(
            FUNCTIONS_HEADING, "bench_functions.py", code, err)
        if code:
            failures.append("bench_functions.py")
        code, out, err = run_script("bench_operator.py", ["--no-write"])
        operator = out if code == 0 and out.strip() else failed_section(
            OPERATOR_HEADING, "bench_operator.py", code or 1, err)
        if code or not out.strip():
            failures.append("bench_operator.py")
        code, out, err = run_script("bench_sidebyside.py", ["--no-write"])
        sidebyside = out if code == 0 and out.strip() else failed_section(
            SIDEBYSIDE_HEADING, "bench_sidebyside.py", code or 1, err)
        if code or not out.strip():
            failures.append("bench_sidebyside.py")
        code, out, err = run_script("bench_lifecycle.py", ["--out", str(Path(scratch) / "lifecycle.md")])
        lifecycle = out if code == 0 and out.strip() else failed_section(
            LIFECYCLE_HEADING, "bench_lifecycle.py", code or 1, err)
        if code or not out.strip():
            failures.append("bench_lifecycle.py")
        code, out, err = run_script("bench_rollout.py", [])
        rollout = out if code == 0 and out.strip() else failed_section(
            ROLLOUT_HEADING, "bench_rollout.py", code or 1, err)
        if code or not out.strip():
            failures.append("bench_rollout.py")
    # the envelope takes up to 30 minutes: only with --envelope; else its last section is kept
    envelope = section_of(DOC.read_text(), ENVELOPE_HEADING) or "" if DOC.exists() else ""
    if "--envelope" in sys.argv[1:]:
        code, out, err = run_script("bench_envelope.py", ["--no-write"])
        envelope = out if code == 0 and out.strip() else failed_section(
            ENVELOPE_HEADING, "bench_envelope.py", code or 1, err)
        if code or not out.strip():
            failures.append("bench_envelope.py")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    document = compose_document(operator, haproxy, functions, lifecycle, rollout, sidebyside, envelope)
    DOC.write_text(document)
    print(document)
    print(f"wrote {DOC.relative_to(REPO)}", file=sys.stderr)
    if failures:
        print(f"FAILED: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
