"""Commands other packages add to `sagaworks`: the `sagaworks.commands` entry points.

A package declares `[project.entry-points."sagaworks.commands"]` in its
pyproject.toml, e.g. `demo = "sagas.order_fulfilment.demo.command:demo"`: the
name is the command's, the object a typer command function (or a
`typer.Typer`). The engine imports a plugin only when its command runs or
help lists it, so plugins neither slow down nor break the engine's own
commands, and cannot replace them. A plugin that cannot be loaded is one
line naming its entry point and module, with exit code 2.
"""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

import typer
from typer.core import TyperGroup

from sagaworks.entrypoints.cli.errors import fail

if TYPE_CHECKING:
    # typer carries its own copy of click; its types are only named there.
    from typer import _click as click

__all__ = ["GROUP", "PluginError", "PluginGroup", "load_command", "plugins"]

GROUP = "sagaworks.commands"


class PluginError(Exception):
    pass


def plugins() -> dict[str, EntryPoint]:
    """The declared plugin commands by name; two different ones of one name are an error."""
    found: dict[str, EntryPoint] = {}
    for point in entry_points(group=GROUP):
        other = found.setdefault(point.name, point)
        if other.value != point.value:
            raise PluginError(
                f'two {GROUP} entry points are named "{point.name}": '
                f"{other.value} and {point.value}"
            )
    return found


def load_command(point: EntryPoint) -> click.Command:
    """Import the entry point's object and make it the command of the entry point's name."""
    try:
        target = point.load()
    except Exception as error:  # noqa: BLE001 - whatever a plugin raises on import is one line
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise PluginError(
            f'cannot load command "{point.name}" from module {point.module} '
            f"({GROUP} entry point {point.name} = {point.value}): {reason}"
        ) from None
    if isinstance(target, typer.Typer):
        app = target
    elif callable(target):
        app = typer.Typer()
        app.command(name=point.name)(target)
    else:
        raise PluginError(
            f'command "{point.name}" ({GROUP} entry point {point.value}) is neither '
            "a function nor a typer.Typer"
        )
    command = typer.main.get_command(app)
    command.name = point.name
    return command


class PluginGroup(TyperGroup):
    """The top-level group: built-in commands first, then plugins, each loaded on first use."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self._builtin = frozenset(self.commands)
        self._listing = False
        self._found: dict[str, EntryPoint] | None = None

    def list_commands(self, ctx: click.Context) -> list[str]:
        listed = super().list_commands(ctx)
        return listed + sorted(name for name in self._plugins() if name not in listed)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None or cmd_name in self._builtin:
            return command
        point = self._plugins().get(cmd_name)
        if point is None:
            return None
        try:
            command = load_command(point)
        except PluginError as error:
            if not self._listing:
                fail(str(error), 2)
            print(f"sagaworks: warning: {error}", file=sys.stderr)  # noqa: T201 - CLI output
            return None
        self.commands[cmd_name] = command
        return command

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Help lists every command: a broken plugin is a warning there, not the end of help."""
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def _plugins(self) -> dict[str, EntryPoint]:
        if self._found is None:
            try:
                self._found = plugins()
            except PluginError as error:
                fail(str(error), 2)
        return self._found
