"""`sagaworks contract`: the message contract of the configured sagas, as documents.

`asyncapi` prints (or writes) the AsyncAPI 3.0 document, `schemas` writes one
JSON Schema per message. Both are generated from the sagas in
`SAGAWORKS_SAGAS`; docs/asyncapi.yaml and docs/schemas/ are their output for
the reference saga, and a test fails when they are stale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from sagaworks.adapters.rabbitmq.asyncapi import asyncapi_document
from sagaworks.application.contract import ContractMessage, contract_messages, message_schema
from sagaworks.application.registry import SagaRegistry
from sagaworks.bootstrap import topology_for
from sagaworks.domain.errors import DefinitionError
from sagaworks.entrypoints.cli.errors import fail, load_settings
from sagaworks.entrypoints.cli.loading import NoSagaToRun, SagaModuleError, load_sagas
from sagaworks.settings import Settings

__all__ = ["Contract", "contract_app", "contract_of"]

contract_app = typer.Typer(
    help="The message contract of the configured sagas: AsyncAPI, JSON Schemas.",
    no_args_is_help=True,
)


@dataclass(frozen=True)
class Contract:
    """The contract of one configuration, rendered as the committed files are."""

    settings: Settings
    registry: SagaRegistry
    messages: tuple[ContractMessage, ...]

    def asyncapi_yaml(self) -> str:
        document = asyncapi_document(
            self.messages,
            topology_for(self.settings, self.registry),
            prefix=self.settings.exchange_prefix,
            version=version("sagaworks"),
        )
        return yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)

    def schema_files(self) -> dict[str, str]:
        """File name (`<type>.json`) -> JSON Schema text, for every message of the contract."""
        return {
            f"{m.message_type}.json": json.dumps(message_schema(m), indent=2, ensure_ascii=False)
            + "\n"
            for m in self.messages
        }


def contract_of(settings: Settings) -> Contract:
    """The contract of the sagas `settings` name; raises when none are, or one cannot load."""
    if not settings.sagas:
        raise NoSagaToRun
    registry = SagaRegistry(load_sagas(settings, with_ports=False).definitions)
    return Contract(settings, registry, contract_messages(registry, settings.publishers))


class _Dumper(yaml.SafeDumper):
    """Multi-line text as YAML blocks, readable in a diff."""


def _text(dumper: yaml.SafeDumper, value: str) -> Any:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def _loaded() -> Contract:
    try:
        return contract_of(load_settings())
    except (NoSagaToRun, SagaModuleError, DefinitionError, ValueError) as error:
        fail(str(error), 7 if isinstance(error, NoSagaToRun) else 2)


Output = Annotated[
    Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")
]


@contract_app.command("asyncapi")
def asyncapi(output: Output = None) -> None:
    """Print the AsyncAPI 3.0 document (YAML) of the sagas in SAGAWORKS_SAGAS."""
    text = _loaded().asyncapi_yaml()
    if output is None:
        typer.echo(text, nl=False)
        return
    output.write_text(text, encoding="utf-8")
    typer.echo(f"wrote {output}")


@contract_app.command("schemas")
def schemas(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for the `<type>.json` files.")
    ],
) -> None:
    """Write one JSON Schema (2020-12) per message type; remove the folder's stale ones."""
    files = _loaded().schema_files()
    output.mkdir(parents=True, exist_ok=True)
    for stale in sorted(set(p.name for p in output.glob("*.json")) - set(files)):
        (output / stale).unlink()
        typer.echo(f"removed {output / stale}")
    for name, text in files.items():
        (output / name).write_text(text, encoding="utf-8")
    typer.echo(f"wrote {len(files)} schemas to {output}")
