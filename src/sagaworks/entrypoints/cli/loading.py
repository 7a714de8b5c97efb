"""Finding the sagas a worker runs: modules named in `SAGAWORKS_SAGAS`.

Each module exposes `SAGA` (a `SagaDefinition`) and `build_ports()`, which
returns the port adapters by port name. The setting has no default: which
participants a worker talks to (real or simulated) is always named. Port
names are shared by the whole worker: two modules may name the same port
only with the very same adapter, never silently replace each other's.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from sagaworks.domain.definition import SagaDefinition
from sagaworks.settings import Settings

__all__ = ["LoadedSagas", "NoSagaToRun", "SagaModuleError", "load_sagas", "sagas_to_run"]


class SagaModuleError(Exception):
    pass


class NoSagaToRun(Exception):
    """`SAGAWORKS_SAGAS` is empty: a worker would consume nothing, so it does not start."""

    def __init__(self) -> None:
        super().__init__(
            "no saga to run: set SAGAWORKS_SAGAS, "
            """e.g. SAGAWORKS_SAGAS='["sagas.order_fulfilment.http_ports"]'"""
        )


@dataclass(frozen=True)
class LoadedSagas:
    definitions: tuple[SagaDefinition[Any], ...]
    ports: dict[str, object]


def load_sagas(settings: Settings, *, with_ports: bool = True) -> LoadedSagas:
    definitions = []
    ports: dict[str, object] = {}
    port_owners: dict[str, str] = {}
    for name in settings.sagas:
        try:
            module = importlib.import_module(name)
        except ImportError as error:
            raise SagaModuleError(
                f'cannot import saga module "{name}" named in SAGAWORKS_SAGAS: {error}'
            ) from error
        definition = getattr(module, "SAGA", None)
        if not isinstance(definition, SagaDefinition):
            raise SagaModuleError(
                f'saga module "{name}" has no SAGA = SagaDefinition(...); add one or '
                "remove the module from SAGAWORKS_SAGAS"
            )
        definitions.append(definition)
        if with_ports:
            build_ports = getattr(module, "build_ports", None)
            if build_ports is None:
                raise SagaModuleError(
                    f'saga module "{name}" has no build_ports() returning its port adapters'
                )
            for port, adapter in build_ports().items():
                if port in ports and ports[port] is not adapter:
                    raise SagaModuleError(
                        f'saga modules "{port_owners[port]}" and "{name}" both give an adapter '
                        f'for port "{port}"; give one of them another port name or share the '
                        "same adapter"
                    )
                ports[port] = adapter
                port_owners.setdefault(port, name)
    return LoadedSagas(tuple(definitions), ports)


def sagas_to_run(settings: Settings) -> LoadedSagas:
    """The sagas and ports a worker runs; at least one saga must be configured."""
    if not settings.sagas:
        raise NoSagaToRun
    return load_sagas(settings)
