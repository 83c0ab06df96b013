"""The `rehost` command: a thin typer layer over the library.

Subcommands are imported only when they run (click's "lazily loading
subcommands" pattern): `rehost image convert` must not pay for importing the
online receiver, the bundler or the object-store launcher. Start-up is part of
every conversion's wall time, and qemu-img starts in milliseconds.
"""

from __future__ import annotations

import gc
import importlib
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from rehost import __version__
from rehost.cli.output import end_logging, errors_as_json, report_error, setup_logging

COMMANDS: dict[str, str] = {
    "upload": "rehost.cli.upload:upload",
    "import": "rehost.cli.importer:import_",
    "receive": "rehost.cli.receive:receive",
    "agent": "rehost.cli.agent:agent",
    "agent-bundle": "rehost.cli.agent:agent_bundle",
    "demo": "rehost.cli.demo:demo",
    "image": "rehost.cli.image:app",
    "objectstore": "rehost.cli.objectstore:app",
}
"""Subcommand name → `module:attribute`, a typer app or a command function, in help order."""


def load_command(name: str) -> Any:
    """The click command for one subcommand, imported on first use."""
    module, _, attr = COMMANDS[name].partition(":")
    obj = getattr(importlib.import_module(module), attr)
    if not isinstance(obj, typer.Typer):
        single = typer.Typer(add_completion=False)
        single.command(name=name)(obj)
        obj = single
    cmd = typer.main.get_command(obj)
    cmd.name = name
    return cmd


class _LazyCommands(MutableMapping[str, Any]):
    """The group's command table; entries are built from COMMANDS when looked up."""

    def __init__(self, eager: Mapping[str, Any]) -> None:
        self._loaded: dict[str, Any] = dict(eager)

    def __getitem__(self, name: str) -> Any:
        if name not in self._loaded:
            if name not in COMMANDS:
                raise KeyError(name)
            self._loaded[name] = load_command(name)
        return self._loaded[name]

    def __setitem__(self, name: str, cmd: Any) -> None:
        self._loaded[name] = cmd

    def __delitem__(self, name: str) -> None:
        del self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        yield from COMMANDS
        yield from (n for n in self._loaded if n not in COMMANDS)

    def __len__(self) -> int:
        return len(COMMANDS.keys() | self._loaded.keys())


class LazyGroup(TyperGroup):
    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self.commands = _LazyCommands(self.commands)


app = typer.Typer(
    name="rehost",
    cls=LazyGroup,
    help="Move servers and disk images into a cloud or KVM fleet.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"rehost {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Show the version and exit.", callback=_version, is_eager=True
        ),
    ] = False,
) -> None:
    """Errors exit 1 with `error: CODE: message` and a `hint:`; usage errors exit 2."""


def main() -> None:
    errors_as_json(False)  # until a --json option says otherwise (main may run twice)
    handler = setup_logging()
    try:
        app()  # typer handles usage errors (exit 2) and --help itself
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except Exception as e:  # every failure leaves through report_error, typed
        sys.exit(report_error(e))
    finally:
        end_logging(handler)
        # The interpreter's exit would run collections over every object typer and
        # botocore built (~70,000): 50 ms of a 2 s import, after the work is done.
        # Frozen objects are left to the process's end to free.
        gc.freeze()
