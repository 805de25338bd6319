"""README stays true: every command documented, every option explained, CI runs the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from pipeline.cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
DESIGN = ROOT / "docs" / "design.md"
#: `ultravox-stages <command>` as the README writes it in examples and prose.
COMMAND_MENTION = re.compile(r"ultravox-stages ([a-z][a-z_-]*)")
#: Files that exist only outside this repository: the docs must never point at them.
OUTSIDE_FILES = ("CONTRACT.md", "PERFORMANCE.md", "NOTES.md", "/work/")


def documented_commands(text: str) -> set[str]:
    return set(COMMAND_MENTION.findall(text))


def every_command() -> dict[str, click.Command]:
    """Every command of the CLI, nested groups included, by its full name."""
    found: dict[str, click.Command] = {}

    def walk(group: click.Group, prefix: str) -> None:
        for name, command in group.commands.items():
            found[prefix + name] = command
            if isinstance(command, click.Group):
                walk(command, f"{prefix}{name} ")

    walk(cli, "")
    return found


def test_every_cli_command_is_documented_in_readme() -> None:
    missing = sorted(set(cli.commands) - documented_commands(README))
    assert not missing, f"commands missing from README.md: {missing}"


def test_every_command_readme_documents_exists_in_the_cli() -> None:
    unknown = sorted(documented_commands(README) - set(cli.commands))
    assert not unknown, f"README.md documents commands the CLI does not have: {unknown}"


def test_readme_documents_the_explore_and_maintenance_commands() -> None:
    assert {"tables", "query", "maintain"} <= documented_commands(README)


@pytest.mark.parametrize("command", ["run", "sandbox"])
def test_every_option_of_run_and_sandbox_is_documented_in_readme(command: str) -> None:
    params = cli.commands[command].params
    missing = [opt for p in params for opt in p.opts + p.secondary_opts if opt.startswith("--") and opt not in README]
    assert not missing, f"{command} options missing from README.md: {missing}"


def test_every_cli_option_has_help_text() -> None:
    lacking = [
        f"{name} {param.opts[0]}"
        for name, command in {"(group)": cli, **every_command()}.items()
        for param in command.params
        if isinstance(param, click.Option) and not (param.help or "").strip()
    ]
    assert not lacking, f"options without help text: {lacking}"


def test_every_command_has_a_help_line() -> None:
    lacking = [name for name, command in every_command().items() if not (command.short_help or command.help or "").strip()]
    assert not lacking, f"commands without help: {lacking}"


def test_readme_opens_with_demo_and_test_commands_and_ci_runs_the_latter() -> None:
    blocks = README.split("```")
    code = [b.split("\n", 1)[1].strip() for b in blocks[1::2]]
    demo_command, test_command = code[0], code[1]
    assert demo_command == "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && ultravox-stages demo"
    assert test_command.endswith("&& pytest")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test_command in ci.splitlines(), "CI must run exactly the README's test command"


@pytest.mark.parametrize("path", ["README.md", "docs/design.md"])
def test_docs_name_no_file_outside_the_repository(path: str) -> None:
    text = (ROOT / path).read_text(encoding="utf-8")
    named = [name for name in OUTSIDE_FILES if name in text]
    assert not named, f"{path} refers to files outside the repository: {named}"


@pytest.mark.parametrize("path", ["README.md", "docs/design.md"])
def test_relative_links_resolve(path: str) -> None:
    document = ROOT / path
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", document.read_text(encoding="utf-8"))
    local = [t for t in targets if "://" not in t]
    assert local, f"{path} links nowhere"
    broken = [t for t in local if not (document.parent / t).exists()]
    assert not broken, f"{path} has broken links: {broken}"


def test_readme_says_parquet_has_all_seven_tables() -> None:
    from pipeline import schema

    assert len(schema.TABLES) == 7 and "seven tables" in README
    for name in schema.TABLES:
        assert f"`{name}`" in README, f"table {name} not described in README.md"


def test_benchmark_figures_are_shown_with_their_machine_and_command() -> None:
    """README's benchmark section shows rows of the last run with the machine; the whole
    table and how to read it are in docs/design.md, under the command that printed it."""
    design = DESIGN.read_text(encoding="utf-8")
    assert "$ python bench/run_bench.py" in design
    section = README.split("## Benchmarks", 1)[1]
    assert "python bench/run_bench.py" in section and "docs/design.md" in section
    assert "machine: " in section and "× dlt's stages/s" in section
    # Only that section quotes bench figures; the rest of README stays free of stale numbers.
    assert "stages/s" not in README.split("## Benchmarks", 1)[0]
