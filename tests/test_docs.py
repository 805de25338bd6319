"""README stays true: every command documented, and CI runs the README's test command."""

from pathlib import Path

from pipeline.cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_command_is_documented_in_readme():
    missing = [name for name in cli.commands if f"ultravox-stages {name}" not in README]
    assert not missing, f"commands missing from README.md: {missing}"


def test_every_run_option_is_documented_in_readme():
    missing = [opt for p in cli.commands["run"].params for opt in p.opts if opt.startswith("--") and opt not in README]
    assert not missing, f"run options missing from README.md: {missing}"


def test_readme_opens_with_demo_and_test_commands_and_ci_runs_the_latter():
    blocks = README.split("```")
    code = [b.split("\n", 1)[1].strip() for b in blocks[1::2]]
    demo_command, test_command = code[0], code[1]
    assert demo_command.endswith("ultravox-stages demo")
    assert "pytest" in test_command
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines(), "CI must run exactly the README's test command"
