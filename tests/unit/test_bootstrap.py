"""What `bootstrap` wires: the queue -> use case table, and the lifecycle of port adapters."""

from __future__ import annotations

from types import TracebackType

import pytest

from sagas.order_fulfilment.saga import order_fulfilment
from sagas.order_fulfilment.simulation.participants import Simulation, simulated_ports
from sagaworks.adapters.rabbitmq.topology import (
    dead_letter_queue_name,
    port_queue_name,
    saga_queue_name,
)
from sagaworks.bootstrap import System, bootstrap, in_memory
from sagaworks.settings import Settings

SETTINGS = Settings.load(secrets_dir=None)


class Closable:
    def __init__(self, name: str, log: list[str], *, fail: bool = False) -> None:
        self.name, self.log, self.fail = name, log, fail

    async def aclose(self) -> None:
        self.log.append(f"close {self.name}")
        if self.fail:
            raise RuntimeError(f"{self.name} would not close")


class Entered:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    async def __aenter__(self) -> Entered:
        self.log.append(f"enter {self.name}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.log.append(f"exit {self.name}")


async def in_memory_system(ports: dict[str, object]) -> System:
    fakes = in_memory(SETTINGS, ports)
    return await bootstrap(
        SETTINGS,
        [order_fulfilment],
        ports,
        clock=fakes.clock,
        store=fakes.store,
        publisher=fakes.publisher,
        caller=fakes.caller,
    )


async def test_the_system_opens_its_port_adapters_and_closes_each_once_though_one_fails() -> None:
    log: list[str] = []
    shared = Closable("inventory", log)
    ports: dict[str, object] = {
        "inventory": shared,
        "stock": shared,
        "payments": Closable("payments", log, fail=True),
        "shipping": Entered("shipping", log),
        "plain": object(),
    }
    system = await in_memory_system(ports)
    assert log == ["enter shipping"]

    with pytest.raises(RuntimeError, match="payments would not close"):
        await system.aclose()
    assert sorted(log) == ["close inventory", "close payments", "enter shipping", "exit shipping"]

    await system.aclose()
    assert len(log) == 4, "a second close closes nothing again"


async def test_routes_name_every_queue_the_engine_consumes_once() -> None:
    system = await in_memory_system(dict(simulated_ports(Simulation())))
    prefix = SETTINGS.exchange_prefix
    routes = system.routes()
    assert [(r.queue, r.port) for r in routes] == [
        (saga_queue_name(prefix, order_fulfilment.name), None),
        *((port_queue_name(prefix, p), p) for p in system.registry.ports()),
        (dead_letter_queue_name(prefix), None),
    ]
    assert routes[-1].handle is system.ingest_dead_letter
    await system.aclose()


class Unopenable(Entered):
    async def __aenter__(self) -> Entered:
        raise ConnectionRefusedError(f"{self.name} cannot be reached")


async def test_a_port_adapter_that_cannot_be_opened_closes_those_opened_before() -> None:
    log: list[str] = []
    ports: dict[str, object] = {
        "inventory": Entered("inventory", log),
        "payments": Unopenable("payments", log),
        "shipping": Closable("shipping", log),
    }
    with pytest.raises(ConnectionRefusedError, match="payments"):
        await in_memory_system(ports)
    assert log == ["enter inventory", "exit inventory"]
