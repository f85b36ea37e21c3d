"""The one CLI: every role is a subcommand, every flag is documented with its environment variable."""

import re

import pytest
from typer.testing import CliRunner

from specedge.cli import app

runner = CliRunner()
ROLES = ["gateway", "scheduler", "verifier", "edge-agent"]


def help_text(*args: str) -> str:
    result = runner.invoke(app, [*args, "--help"], terminal_width=200, env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return re.sub(r"[│╭╮╰╯─]", " ", result.output)


def test_top_level_lists_every_role_and_up():
    text = help_text()
    for command in [*ROLES, "up", "status"]:
        assert re.search(rf"^\s+{command}\s", text, re.M), command


@pytest.mark.parametrize(
    ("role", "flags"),
    [
        ("gateway", ["--nats-url", "--credentials", "--redis-url", "--host", "--port", "--tokenizer",
                     "--max-context", "--max-body-mib", "--require-api-key", "--max-concurrent-per-key", "--dashboard",
                     "--name",
                     "--log-level"]),
        ("scheduler", ["--nats-url", "--credentials", "--redis-url", "--max-batch", "--edge-timeout",
                       "--verifier-timeout", "--draft-timeout", "--request-timeout", "--session-ttl", "--strategy",
                       "--budget", "--server-budget", "--depth", "--server-depth", "--edge-offence-limit",
                       "--edge-suspend", "--metrics-port", "--name", "--log-level"]),
        ("verifier", ["--nats-url", "--credentials",
                     "--redis-url", "--target", "--device", "--dtype", "--max-sessions", "--max-len",
                      "--attention", "--exact", "--kv-cache-memory", "--plan", "--memory-gib", "--metrics-port",
                      "--name", "--log-level"]),
        ("edge-agent", ["--nats-url", "--credentials",
                     "--draft", "--device", "--dtype", "--max-sessions", "--max-len", "--attention", "--exact",
                        "--user", "--server-side", "--proactive", "--send-ahead", "--trees-ahead", "--emulate-rtt-ms",
                        "--name", "--log-level"]),
        ("up", ["--nats-url", "--redis-url", "--host", "--port", "--edges", "--api-key", "--server-drafter",
                "--ready-timeout", "--dtype", "--attention", "--exact", "--log-level"]),
    ],
)
def test_each_flag_is_documented_with_its_env_var(role, flags):
    text = help_text(role)
    for flag in flags:
        assert flag in text, flag
        env = "SPECEDGE_" + flag.removeprefix("--").replace("-", "_").upper()
        assert env in text, env
    options = set(re.findall(r"(--[a-z][a-z-]+)", text)) - {"--help", "--no-api-key", "--no-server-drafter",
                                                               "--no-proactive", "--no-send-ahead",
                                                               "--no-dashboard", "--fast"}
    assert options == set(flags), f"--help lists options the test does not know: {options ^ set(flags)}"


def test_edge_agent_never_takes_redis():
    assert "--redis-url" not in help_text("edge-agent")


def test_bad_flag_value_is_a_usage_error_not_a_traceback():
    result = runner.invoke(app, ["scheduler", "--nats-url", "http://nope"], env={"NO_COLOR": "1"})
    assert result.exit_code == 2
    assert "expected a nats://" in result.output
    assert "Traceback" not in result.output


def test_env_var_is_read_when_flag_is_absent():
    result = runner.invoke(app, ["scheduler"], env={"SPECEDGE_NATS_URL": "http://from-env", "NO_COLOR": "1"})
    assert result.exit_code == 2
    assert "http://from-env" in result.output
