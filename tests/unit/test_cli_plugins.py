"""Commands from `sagaworks.commands` entry points: found, loaded on use, failing in one line."""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sagaworks.entrypoints.cli import plugins
from sagaworks.entrypoints.cli.app import app

pytestmark = pytest.mark.unit

runner = CliRunner()

GREETING = '''
import typer


def hello(name: str = "world") -> None:
    """Say hello."""
    typer.echo(f"hello {name}")


group = typer.Typer(help="Two commands.")


@group.command()
def one() -> None:
    typer.echo("one")


@group.command()
def two() -> None:
    typer.echo("two")


NOT_A_COMMAND = 3
'''


def point(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=plugins.GROUP)


@pytest.fixture
def declared(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[EntryPoint]:
    """The entry points the CLI sees instead of the installed ones; a plugin module on the path."""
    (tmp_path / "greeting_plugin.py").write_text(GREETING)
    monkeypatch.syspath_prepend(str(tmp_path))
    found: list[EntryPoint] = []
    monkeypatch.setattr(plugins, "entry_points", lambda group: list(found))
    return found


def test_the_installed_package_declares_demo_and_bench() -> None:
    declared = {p.name: p.value for p in entry_points(group=plugins.GROUP)}

    assert declared["demo"] == "sagas.order_fulfilment.demo.command:demo"
    assert declared["bench"] == "sagas.order_fulfilment.bench.command:bench"


def test_help_lists_the_installed_plugin_commands() -> None:
    result = runner.invoke(app, ["--help"])

    assert result.exit_code == 0, result.output
    assert "Drive ORDERS orders" in result.stdout
    assert "Benchmark the engine" in result.stdout


def test_a_plugin_function_becomes_a_command_of_the_entry_point_name(
    declared: list[EntryPoint],
) -> None:
    declared.append(point("greet", "greeting_plugin:hello"))

    result = runner.invoke(app, ["greet", "--name", "shop"])

    assert result.exit_code == 0, result.output
    assert result.stdout == "hello shop\n"


def test_a_plugin_typer_app_becomes_a_command_group(declared: list[EntryPoint]) -> None:
    declared.append(point("numbers", "greeting_plugin:group"))

    result = runner.invoke(app, ["numbers", "two"])

    assert result.exit_code == 0, result.output
    assert result.stdout == "two\n"


def test_a_plugin_cannot_replace_a_built_in_command(declared: list[EntryPoint]) -> None:
    declared.append(point("worker", "greeting_plugin:hello"))

    result = runner.invoke(app, ["worker", "--help"])

    assert result.exit_code == 0, result.output
    assert "Consume and drive sagas" in result.stdout


def test_a_plugin_that_cannot_be_imported_is_one_line_naming_it(
    declared: list[EntryPoint],
) -> None:
    declared.append(point("broken", "no_such_plugin.commands:run"))

    result = runner.invoke(app, ["broken"])

    assert result.exit_code == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith('sagaworks: error: cannot load command "broken" from module ')
    assert "no_such_plugin.commands" in line
    assert "ModuleNotFoundError" in line
    assert "Traceback" not in result.stderr


def test_a_plugin_object_that_is_no_command_is_one_line(declared: list[EntryPoint]) -> None:
    declared.append(point("three", "greeting_plugin:NOT_A_COMMAND"))

    result = runner.invoke(app, ["three"])

    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert "greeting_plugin:NOT_A_COMMAND" in line
    assert "neither a function nor a typer.Typer" in line


def test_help_warns_of_a_broken_plugin_and_lists_the_rest(declared: list[EntryPoint]) -> None:
    declared.extend(
        [point("broken", "no_such_plugin.commands:run"), point("greet", "greeting_plugin:hello")]
    )

    result = runner.invoke(app, ["--help"])

    assert result.exit_code == 0, result.output
    assert "Say hello." in result.stdout
    assert "worker" in result.stdout
    (line,) = result.stderr.splitlines()
    assert line.startswith('sagaworks: warning: cannot load command "broken"')


def test_built_in_commands_do_not_import_plugins(declared: list[EntryPoint]) -> None:
    declared.append(point("broken", "no_such_plugin.commands:run"))

    result = runner.invoke(app, ["config", "show", "--json"])

    assert result.exit_code == 0, result.output
    assert result.stderr == ""


def test_two_plugins_of_one_name_are_an_error(declared: list[EntryPoint]) -> None:
    declared.extend([point("greet", "greeting_plugin:hello"), point("greet", "other_plugin:greet")])

    result = runner.invoke(app, ["greet"])

    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert "greeting_plugin:hello" in line
    assert "other_plugin:greet" in line
