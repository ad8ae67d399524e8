"""The three command lines through their installed entry points: versions, usage errors that
name the flag or variable (exit 2, no traceback), log level and JSON logs, and an operator
that stops at once when it has no Kubernetes credentials."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from support.agents import AgentGroup

import colo_agent

BIN = Path(sys.executable).parent


def entry_point(name: str) -> str:
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is not installed (pip install -e .)"
    return found


def run(name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60,
        home: Path | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("COLO_") and k not in
            ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}  # fmt: skip
    if home is not None:
        base["HOME"] = str(home)
    return subprocess.run(
        [entry_point(name), *args], env={**base, **(env or {})}, capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def usage_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


@pytest.mark.parametrize("name", ["colo-agent", "colo-operator", "kubectl-colo"])
def test_every_command_line_has_a_version(name: str) -> None:
    result = run(name, "--version")
    assert result.returncode == 0, result.stderr
    assert colo_agent.__version__ in result.stdout


def test_a_bad_priority_in_the_environment_is_a_usage_error_naming_it() -> None:
    helped = run("colo-operator", "--help", env={"COLO_PRIORITY": "abc"})
    assert helped.returncode == 0 and "Traceback" not in helped.stderr, helped.stderr
    usage_error(run("colo-operator", env={"COLO_PRIORITY": "abc"}), "--priority", "COLO_PRIORITY", "'abc'")


@pytest.mark.parametrize("name", ["colo-operator", "colo-agent"])
def test_a_bad_log_level_or_format_is_a_usage_error_naming_the_variable(name: str) -> None:
    # The agent's subcommand parses fine; only the environment is wrong.
    args = () if name == "colo-operator" else ("run", "--role", "primary", "--arbiter", "file:/nonexistent")
    usage_error(run(name, *args, env={"COLO_LOG_LEVEL": "LOUD"}), "COLO_LOG_LEVEL", "'LOUD'")
    usage_error(run(name, *args, env={"COLO_LOG_FORMAT": "xml"}), "COLO_LOG_FORMAT", "'xml'")
    usage_error(run(name, "--log-level", "LOUD", *args), "--log-level")


def test_a_malformed_arbiter_is_a_usage_error_like_the_others(tmp_path: Path) -> None:
    env = {"COLO_SECRET": "s" * 32, "COLO_INSECURE_CLEAR": "true"}
    for spec, why in [("foo:bar", "unknown kind 'foo'"), ("lease:justaname", "lease:NAMESPACE/NAME"),
                      ("file", "expected lease:NAMESPACE/NAME or file:PATH")]:  # fmt: skip
        result = run("colo-agent", "run", "--role", "primary", "--arbiter", spec, env=env)
        usage_error(result, "--arbiter", why)


def test_the_operator_without_credentials_says_so_and_exits(tmp_path: Path) -> None:
    result = run("colo-operator", "--standalone", home=tmp_path, timeout=30)
    usage_error(result, "no Kubernetes credentials", "KUBECONFIG")
    missing = tmp_path / "nowhere.kubeconfig"
    result = run("colo-operator", "--kubeconfig", str(missing), home=tmp_path)
    usage_error(result, str(missing), "does not exist")
    # The same refusal as a JSON log line.
    result = run("colo-operator", env={"COLO_LOG_FORMAT": "json"}, home=tmp_path)
    assert result.returncode == 2
    (line,) = [json.loads(text) for text in result.stderr.splitlines() if text.strip()]
    assert line["level"] == "ERROR" and line["logger"] == "colo_operator"
    assert "no Kubernetes credentials" in line["message"] and line["time"].endswith("Z")


def test_colo_agent_honours_the_log_level_and_format_from_its_environment(tmp_path: Path) -> None:
    groups = [AgentGroup(tmp_path / "quiet"), AgentGroup(tmp_path / "loud")]
    try:
        for group in groups:
            group.workdir.mkdir()
        quiet = groups[0].spawn("quiet", "primary", memory="16Mi", env={"COLO_LOG_LEVEL": "WARNING"})
        loud = groups[1].spawn("loud", "primary", memory="16Mi",
                               env={"COLO_LOG_LEVEL": "info", "COLO_LOG_FORMAT": "json"})  # fmt: skip
        for agent in (quiet, loud):
            agent.wait_for("serving as primary", lambda s: s.role == "primary")
        # A primary without a secondary: its ack age runs from becoming primary, in status and metrics.
        status = loud.wait_for("reporting its ack age", lambda s: (s.ack_age_ms or 0) > 0)
        assert status.ack_age_ms is not None
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{loud.control_url}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        ack_age = next(line for line in metrics.splitlines() if line.startswith("colo_ack_age_seconds "))
        assert float(ack_age.split()[1]) > 0
        assert 'colo_checkpoints_total{cause="mismatch"} 0.0' in metrics
        assert "process_resident_memory_bytes" in metrics
    finally:
        for group in groups:
            group.close()
    quiet_lines = quiet.log().splitlines()
    assert not [line for line in quiet_lines if " INFO " in line], quiet_lines
    records = [json.loads(line) for line in loud.log().splitlines() if line.startswith("{")]
    assert records, loud.log()
    assert {r["level"] for r in records} >= {"INFO"}
    assert all(set(r) >= {"time", "level", "logger", "message"} for r in records)
    # Nothing but JSON lines on the agent's stderr.
    assert all(line.startswith("{") for line in loud.log().splitlines() if line.strip()), loud.log()


def test_an_agent_without_certificates_or_the_explicit_opt_out_refuses_to_start(tmp_path: Path) -> None:
    env = {"COLO_SECRET": "s" * 32}
    result = run("colo-agent", "run", "--role", "primary", "--arbiter", f"file:{tmp_path / 'a'}", env=env)
    usage_error(result, "TLS is required", "--tls-dir", "--insecure-clear")
    result = run("colo-agent", "run", "--role", "primary", "--arbiter", f"file:{tmp_path / 'a'}",
                 "--tls-dir", str(tmp_path), env=env)  # fmt: skip
    usage_error(result, "tls.crt is missing")
