"""`make demo DEMO_SECONDS=N` and `make demo-down`, as a user runs them (the demo's own control plane)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path


def running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def demo(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "poolkeeper_dev.demo", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def down(folder: Path, pids: list[int]) -> None:
    """`make demo-down`: every process `up` started stops."""
    stopped = demo("down", "--dir", str(folder), timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert not any(running(pid) for pid in pids)


def test_demo_runs_unattended_and_demo_down_stops_everything(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    up = demo("up", "--dir", str(folder), "--seconds", "8", timeout=240)
    pids: list[int] = []
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        summary = next(line for line in up.stdout.splitlines() if line.startswith("demo: summary:"))
        assert " 0 failed" in summary and "roll steps" in summary, summary
        assert "{'econ': 0, 'eresp': 0, 'wretr': 0, 'wredis': 0}" in summary, summary
        assert "MEMBER" in up.stdout and "Active" in up.stdout  # the live view was shown
        assert (folder / "audit.log").read_text().count("dev.poolkeeper.instance.up") >= 4
        state = json.loads((folder / "demo.json").read_text())
        pids = [state["operator_pid"], state["haproxy_pid"]]
        assert all(running(pid) for pid in pids)
    finally:
        down(folder, pids)
    cluster = json.loads((folder / "cluster" / "state.json").read_text())
    assert cluster["pids"] == {}


def test_aws_demo_scales_a_group_out_and_in_with_the_pool_following(tmp_path: Path) -> None:
    """`make demo AWS=1 DEMO_SECONDS=N`: the Auto Scaling group on the emulator scales out and in, every
    lifecycle hook is completed with CONTINUE by the operator, no request fails; `down` stops the emulator too."""
    folder = tmp_path / "demo-aws"
    up = demo("up", "--aws", "--dir", str(folder), "--seconds", "20", timeout=300)
    pids: list[int] = []
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        summary = next(line for line in up.stdout.splitlines() if line.startswith("demo: summary:"))
        assert " 0 failed" in summary and "{'econ': 0, 'eresp': 0, 'wretr': 0, 'wredis': 0}" in summary, summary
        launches, terminations = (int(n) for n in re.findall(r"(\d+) launches and (\d+) terminations", summary)[0])
        completed, sent = (int(n) for n in re.findall(r"(\d+) of (\d+) with CONTINUE", summary)[0])
        assert launches >= 3 and terminations >= 1 and completed == sent == launches + terminations, summary
        members, instances = (int(n) for n in re.findall(r"members now (\d+), group instances (\d+)", summary)[0])
        assert members == instances >= 1, summary
        assert "Auto Scaling group web-asg" in up.stdout and "MEMBER" in up.stdout  # the live view was shown
        # what the emulator received from the operator, one line per call
        calls = [json.loads(line) for line in (folder / "lifecycle-actions.jsonl").read_text().splitlines()]
        results = [c["LifecycleActionResult"] for c in calls if c["Action"] == "CompleteLifecycleAction"]
        assert results == ["CONTINUE"] * sent
        state = json.loads((folder / "demo.json").read_text())
        pids = [state["operator_pid"], state["haproxy_pid"], state["emulator_pid"]]
        assert all(running(pid) for pid in pids)
    finally:
        down(folder, pids)
