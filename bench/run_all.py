"""Run every benchmark in sequence and write docs/benchmarks.md (operator section first).

    .venv/bin/python bench/run_all.py        # what `make bench` runs
    .venv/bin/python bench/run_all.py --quick      # the small points, in minutes; writes nothing
    .venv/bin/python bench/run_all.py --envelope   # also bench_envelope.py (up to 30 min; not in CI)
    .venv/bin/python bench/run_all.py --shards     # also bench_shards.py (one vs two replicas)

Each script runs as a subprocess with this interpreter; its markdown table is what it prints on
stdout (progress goes to stderr, which is passed through). A script that fails is reported in
its section of the document, and the exit code is then 1.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from quiet import wait_until_quiet

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
        "and rewrites this file. Each starts once the machine's CPUs are under 25% busy over 2 s (`bench/quiet.py`, "
        "from /proc/stat), so one benchmark's tear-down is not measured by the next. "
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


@dataclass(frozen=True)
class Step:
    """One benchmark of `make bench`: its script, its arguments (full and --quick) and its section."""

    script: str
    heading: str
    args: Callable[[Path], list[str]]  # the scratch folder -> arguments of a full run
    quick: list[str] | None = None  # added to those in a --quick run (None: left out of --quick)
    section: Callable[[str], str] = lambda out: out  # its stdout -> its section of the document


STEPS = (
    Step("bench_haproxy.py", HAPROXY_HEADING, lambda scratch: [], ["--iterations", "100"], haproxy_section),
    # bench_functions.py writes its table to --out as well: keep that copy out of docs/.
    Step("bench_functions.py", FUNCTIONS_HEADING, lambda scratch: ["--out", str(scratch / "functions.md")],
         ["--invocations", "200", "--deliveries", "300", "--repeats", "1"], functions_section),
    Step("bench_operator.py", OPERATOR_HEADING, lambda scratch: ["--no-write"], ["--quick"]),
    Step("bench_sidebyside.py", SIDEBYSIDE_HEADING, lambda scratch: ["--no-write"], ["--quick"]),
    Step("bench_lifecycle.py", LIFECYCLE_HEADING, lambda scratch: ["--out", str(scratch / "lifecycle.md")],
         ["--transitions", "200"]),
    Step("bench_rollout.py", ROLLOUT_HEADING, lambda scratch: []),  # a real node: not in --quick
)


def run_step(step: Step, scratch: Path, quick: bool, failures: list[str]) -> str:
    """The step's section of the document; a failure is reported there and in `failures`.

    It starts once the machine is quiet: not while the previous step's processes still exit."""
    args = [*((step.quick or []) if quick else []), *step.args(scratch)]
    busy = wait_until_quiet()
    print(f"== the CPUs were {busy:.0%} busy before {step.script}", file=sys.stderr, flush=True)
    code, out, err = run_script(step.script, args)
    if code or not out.strip():
        failures.append(step.script)
        return failed_section(step.heading, step.script, code or 1, err)
    return step.section(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the small points only, in minutes: prints the document, writes nothing")
    parser.add_argument("--envelope", action="store_true", help="also bench_envelope.py (up to 30 min)")
    parser.add_argument("--shards", action="store_true",
                        help="also bench_shards.py (one and two replicas; it rewrites its table in docs/scaling.md)")
    args = parser.parse_args(argv)
    failures: list[str] = []
    sections: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="pk-bench-") as scratch:
        for step in STEPS:
            if not args.quick or step.quick is not None:
                sections[step.heading] = run_step(step, Path(scratch), args.quick, failures)
    # the envelope takes up to 30 minutes: only with --envelope; else its last section is kept
    previous = DOC.read_text() if DOC.exists() else ""
    sections[ENVELOPE_HEADING] = "" if args.quick else section_of(previous, ENVELOPE_HEADING) or ""
    if args.envelope:
        sections[ENVELOPE_HEADING] = run_step(
            Step("bench_envelope.py", ENVELOPE_HEADING,
                 lambda scratch: ["--no-write", "--cold-poll", "0", "--cold-starts", "3"],
                 ["--quick"]),
            Path(), args.quick, failures)
    if args.shards:  # its table lives in docs/scaling.md, which it rewrites itself (not with --quick)
        code, _, _ = run_script("bench_shards.py", ["--quick", "--no-write"] if args.quick else [])
        if code:
            failures.append("bench_shards.py")
    document = compose_document(
        sections.get(OPERATOR_HEADING, ""), sections.get(HAPROXY_HEADING, ""), sections.get(FUNCTIONS_HEADING, ""),
        sections.get(LIFECYCLE_HEADING, ""), sections.get(ROLLOUT_HEADING, ""), sections.get(SIDEBYSIDE_HEADING, ""),
        sections[ENVELOPE_HEADING])
    if args.quick:
        print(document)
        print("quick run: docs/benchmarks.md left as it was", file=sys.stderr)
    else:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(document)
        print(document)
        print(f"wrote {DOC.relative_to(REPO)}", file=sys.stderr)
    if failures:
        print(f"FAILED: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
