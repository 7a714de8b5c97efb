"""Which participants a worker gets is always named: no default saga, no silent simulation."""

from __future__ import annotations

import pytest

from sagas.order_fulfilment.http_ports import HttpInventory
from sagas.order_fulfilment.saga import order_fulfilment
from sagas.order_fulfilment.simulation.participants import SimulatedInventory
from sagaworks.entrypoints.cli.loading import NoSagaToRun, SagaModuleError, sagas_to_run
from sagaworks.settings import Settings

pytestmark = pytest.mark.unit


def settings(*modules: str) -> Settings:
    return Settings.load(secrets_dir=None, sagas=modules)


def test_a_worker_without_a_saga_module_is_refused() -> None:
    with pytest.raises(NoSagaToRun, match=r"set SAGAWORKS_SAGAS, e\.g\. SAGAWORKS_SAGAS="):
        sagas_to_run(settings())


def test_the_saga_package_builds_no_participants() -> None:
    with pytest.raises(SagaModuleError, match="has no build_ports"):
        sagas_to_run(settings("sagas.order_fulfilment"))


def test_the_simulation_is_chosen_by_its_own_module() -> None:
    loaded = sagas_to_run(settings("sagas.order_fulfilment.simulation"))

    assert loaded.definitions == (order_fulfilment,)
    assert isinstance(loaded.ports["inventory"], SimulatedInventory)


async def test_the_http_module_wires_the_real_adapters() -> None:
    loaded = sagas_to_run(settings("sagas.order_fulfilment.http_ports"))

    assert loaded.definitions == (order_fulfilment,)
    assert isinstance(loaded.ports["inventory"], HttpInventory)
    for port in loaded.ports.values():
        await port.aclose()  # type: ignore[attr-defined]
