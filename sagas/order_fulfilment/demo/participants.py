"""The participants the demo drives: simulated in process, or fake services over real HTTP.

`sagaworks demo --ports http` starts the fake inventory, payments and
shipping services on loopback (ephemeral ports) and wires the HTTP port
adapters to them, so the demo exercises the same adapters, idempotency keys
and status-code mapping as a deployment talking to real participants.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["DemoParticipants", "DemoPorts", "demo_participants"]


class DemoPorts(StrEnum):
    SIMULATED = "simulated"
    HTTP = "http"


@dataclass(frozen=True)
class DemoParticipants:
    ports: dict[str, object]
    duplicate_effects: Callable[[], int]
    effects: Callable[[], Counter[str]]
    """Effects applied, by operation."""
    aclose: Callable[[], Awaitable[None]]


async def demo_participants(
    kind: DemoPorts, seed: int, on_booked: Callable[[str, str], None]
) -> DemoParticipants:
    # Imported here: the CLI imports `DemoPorts` at start-up, and aiohttp is not light.
    from sagas.order_fulfilment.http_ports import http_ports
    from sagas.order_fulfilment.simulation.fake_services import FakeServices
    from sagas.order_fulfilment.simulation.participants import Ledger, Simulation, simulated_ports

    if kind is DemoPorts.SIMULATED:
        ledger = Ledger()

        async def nothing() -> None:
            return None

        return DemoParticipants(
            simulated_ports(Simulation(seed=seed), ledger, on_booked),
            ledger.duplicate_effects,
            lambda: Counter(op for (op, _) in ledger.effects.elements()),
            nothing,
        )
    services = FakeServices(on_booked=on_booked)
    await services.start()
    ports = http_ports(services.settings())

    def effects() -> Counter[str]:
        return Counter(op for p in services.participants for (op, _) in p.effects.elements())

    async def aclose() -> None:
        for port in ports.values():
            await port.aclose()
        await services.stop()

    return DemoParticipants(dict(ports), services.duplicate_effects, effects, aclose)
