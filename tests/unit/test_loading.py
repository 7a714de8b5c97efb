"""Loading the saga modules named in `SAGAWORKS_SAGAS`: definitions and port adapters."""

from __future__ import annotations

import sys
from types import ModuleType

import pytest

from sagas.order_fulfilment.saga import order_fulfilment
from sagaworks.entrypoints.cli.loading import SagaModuleError, load_sagas
from sagaworks.settings import Settings

pytestmark = pytest.mark.unit


def saga_module(monkeypatch: pytest.MonkeyPatch, name: str, ports: dict[str, object]) -> str:
    """Register an importable saga module `name` whose `build_ports()` returns `ports`."""
    module = ModuleType(name)
    module.__dict__.update(SAGA=order_fulfilment, build_ports=lambda: ports)
    monkeypatch.setitem(sys.modules, name, module)
    return name


def test_the_ports_of_every_module_are_loaded_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    payments, shipping = object(), object()
    first = saga_module(monkeypatch, "sagas_a", {"payments": payments})
    second = saga_module(monkeypatch, "sagas_b", {"shipping": shipping})

    loaded = load_sagas(Settings.load(secrets_dir=None, sagas=(first, second)))

    assert loaded.ports == {"payments": payments, "shipping": shipping}
    assert loaded.definitions == (order_fulfilment, order_fulfilment)


def test_two_modules_may_share_the_very_same_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    payments = object()
    first = saga_module(monkeypatch, "sagas_a", {"payments": payments})
    second = saga_module(monkeypatch, "sagas_b", {"payments": payments})

    loaded = load_sagas(Settings.load(secrets_dir=None, sagas=(first, second)))

    assert loaded.ports == {"payments": payments}


def test_a_later_module_does_not_replace_another_modules_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = saga_module(monkeypatch, "sagas_a", {"payments": object()})
    second = saga_module(monkeypatch, "sagas_b", {"payments": object()})

    with pytest.raises(SagaModuleError) as raised:
        load_sagas(Settings.load(secrets_dir=None, sagas=(first, second)))

    assert '"sagas_a"' in str(raised.value)
    assert '"sagas_b"' in str(raised.value)
    assert 'port "payments"' in str(raised.value)


def test_without_ports_only_the_definitions_are_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    first = saga_module(monkeypatch, "sagas_a", {"payments": object()})
    second = saga_module(monkeypatch, "sagas_b", {"payments": object()})

    loaded = load_sagas(Settings.load(secrets_dir=None, sagas=(first, second)), with_ports=False)

    assert loaded.ports == {}
    assert loaded.definitions == (order_fulfilment, order_fulfilment)
