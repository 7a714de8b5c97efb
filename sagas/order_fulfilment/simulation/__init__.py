"""The order-fulfilment saga with simulated participants, and everything else it fakes.

`SAGA` and `build_ports()` make this a saga module a worker can load, chosen
explicitly with `SAGAWORKS_SAGAS='["sagas.order_fulfilment.simulation"]'`:
no payment is real. The simulated participants can be made slow or flaky
from the environment, so that such a worker behaves like one talking to
real services:

- `ORDER_FULFILMENT_SIM_LATENCY_S`: seconds every port call takes (default 0);
- `ORDER_FULFILMENT_SIM_FAILURE_RATE`: share of port calls that fail
  transiently, in [0, 1) (default 0).

The modules around it are what the demo, the bench and the tests drive the
saga with: `participants` (in process), `fake_services` (over HTTP on
loopback), `shop` (order service and warehouse over RabbitMQ) and
`order_mix` (the demo's orders and their expected outcomes).
"""

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from sagas.order_fulfilment.saga import order_fulfilment
from sagas.order_fulfilment.simulation.participants import Simulation, simulated_ports
from sagaworks import DefinitionError

__all__ = ["SAGA", "SimulationSettings", "build_ports"]

SAGA = order_fulfilment


class SimulationSettings(BaseSettings):
    """How the simulated participants behave: `ORDER_FULFILMENT_SIM_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="ORDER_FULFILMENT_SIM_", frozen=True)

    latency_s: float = Field(default=0.0, ge=0.0, le=600.0)
    failure_rate: float = Field(default=0.0, ge=0.0, lt=1.0)


def build_ports() -> dict[str, object]:
    """The simulated participants, as the environment configures them."""
    try:
        simulation = SimulationSettings()
    except ValidationError as error:
        problems = "; ".join(
            f"ORDER_FULFILMENT_SIM_{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}"
            for e in error.errors()
        )
        raise DefinitionError(SAGA.name, f"invalid simulation settings: {problems}") from None
    return simulated_ports(
        Simulation(latency_s=simulation.latency_s, failure_rate=simulation.failure_rate)
    )
