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
        ("gateway", ["--nats-url", "--credentials", "--nats-wait", "--redis-url", "--host", "--port", "--tokenizer",
                     "--max-context", "--max-body-mib", "--require-api-key", "--max-concurrent-per-key", "--dashboard",
                     "--lenient", "--reasoning-parser", "--tool-call-parser", "--name",
                     "--log-level"]),
        ("scheduler", ["--nats-url", "--credentials", "--nats-wait", "--redis-url", "--max-batch", "--edge-timeout",
                       "--verifier-timeout", "--draft-timeout", "--request-timeout", "--session-ttl", "--strategy",
                       "--budget", "--server-budget", "--depth", "--server-depth", "--edge-offence-limit",
                       "--edge-suspend", "--metrics-port", "--name", "--log-level"]),
        ("verifier", ["--nats-url", "--credentials", "--nats-wait",
                     "--redis-url", "--target", "--device", "--dtype", "--max-sessions", "--max-len",
                      "--attention", "--exact", "--kv-cache-memory", "--plan", "--memory-gib", "--tensor-parallel",
                      "--metrics-port",
                      "--name", "--log-level"]),
        ("edge-agent", ["--nats-url", "--credentials", "--api-key",
                     "--draft", "--device", "--dtype", "--max-sessions", "--max-len", "--attention", "--exact",
                        "--user", "--server-side", "--proactive", "--send-ahead", "--trees-ahead",
                        "--name", "--log-level"]),
        ("up", ["--nats-url", "--nats-nodes", "--redis-url", "--redis-ha", "--host", "--port", "--edges", "--api-key",
                "--server-drafter", "--ready-timeout", "--dtype", "--attention", "--exact", "--log-level"]),
    ],
)
def test_each_flag_is_documented_with_its_env_var(role, flags):
    text = help_text(role)
    for flag in flags:
        assert flag in text, flag
        env = "SPECEDGE_" + flag.removeprefix("--").replace("-", "_").upper()
        assert env in text, env
    options = set(re.findall(r"(--[a-z][a-z-]+)", text)) - {"--help", "--no-api-key", "--no-server-drafter",
                                                               "--no-redis-ha", "--no-proactive", "--no-send-ahead",
                                                               "--no-dashboard", "--fast", "--strict"}
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


SETTINGS = {"gateway": "specedge_gateway.settings:GatewaySettings",
            "scheduler": "specedge_scheduler.settings:SchedulerSettings",
            "verifier": "specedge_verifier.settings:VerifierSettings",
            "edge-agent": "edge_agent.settings:EdgeAgentSettings", "up": "specedge.config:UpSettings"}
COMMAND_LINE_ONLY = {"exact", "plan", "memory_gib"}  # shorthands and other modes of a command, not settings
BUNDLED = {"tokenizer", "target", "draft"}  # None on the command line: the bundled model


@pytest.mark.parametrize("role", sorted(SETTINGS))
def test_every_option_defaults_to_its_settings_models_default(role):
    """Each default is declared once, in the service's settings model (or the policy's and the
    guard's own, which the settings read): the command line takes it from there."""
    import importlib
    import inspect
    from importlib.metadata import entry_points

    from specedge import cli

    module, name = SETTINGS[role].split(":")
    settings = getattr(importlib.import_module(module), name)
    command = cli.up if role == "up" else \
        next(ep for ep in entry_points(group="specedge.commands") if ep.name == role).load()
    for param, spec in inspect.signature(command).parameters.items():
        if param in COMMAND_LINE_ONLY:
            continue
        field = param if param in settings.model_fields else f"{param}_s"
        assert field in settings.model_fields, f"{role} --{param} has no settings field"
        default = spec.default.default if hasattr(spec.default, "param_decls") else spec.default  # typer.Option(...)
        if param in BUNDLED:
            assert default is None and settings.model_fields[field].is_required(), param
        else:
            assert default == settings.model_fields[field].default, (role, param)


def test_the_schedulers_settings_take_the_policys_and_the_guards_defaults():
    from specedge_scheduler.guard import GuardLimits
    from specedge_scheduler.policy import PolicyConfig, SchedulingPolicy
    from specedge_scheduler.settings import SchedulerSettings

    settings = SchedulerSettings()
    assert settings.policy_config() == PolicyConfig()
    assert settings.guard_limits() == GuardLimits()
    assert SchedulingPolicy().config == PolicyConfig() and SchedulingPolicy().strategy.name == "pipeline"
