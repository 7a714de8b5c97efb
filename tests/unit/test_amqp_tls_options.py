"""The TLS options of an AMQP URL are checked before any connection is tried."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagaworks.adapters.rabbitmq.connection import check_tls_options
from sagaworks.adapters.rabbitmq.errors import InvalidBrokerUrl
from sagaworks.entrypoints.cli.errors import EXIT_CODES

pytestmark = pytest.mark.unit

SECRET = "amqp-secret-never-shown"


@pytest.fixture
def pem(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return path


@pytest.mark.parametrize(
    "query",
    [
        "",
        "cafile={pem}",
        "cafile={pem}&certfile={pem}&keyfile={pem}",
        "no_verify_ssl=1",
        "no_verify_ssl=0&heartbeat=30",
    ],
)
def test_usable_tls_options_pass(pem: Path, query: str) -> None:
    check_tls_options(f"amqps://svc:{SECRET}@h:5671/?" + query.format(pem=pem))


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("amqp://svc:{secret}@h/?cafile={pem}", "cafile only apply to TLS but the URL is amqp://"),
        ("amqps://svc:{secret}@h/?cafile=/nonexistent/ca.pem", "cafile file /nonexistent"),
        ("amqps://svc:{secret}@h/?keyfile={pem}", "keyfile is given without certfile"),
        ("amqps://svc:{secret}@h/?certfile={pem}&keyfile=/nope.key", "keyfile file /nope.key"),
        ("amqps://svc:{secret}@h/?no_verify_ssl=yes", "no_verify_ssl=yes is neither 0 nor 1"),
    ],
)
def test_unusable_tls_options_are_one_clear_error(pem: Path, url: str, problem: str) -> None:
    with pytest.raises(InvalidBrokerUrl) as caught:
        check_tls_options(url.format(secret=SECRET, pem=pem))

    message = str(caught.value)
    assert problem in message
    assert message.startswith("invalid SAGAWORKS_AMQP_URL (amqp")
    assert "svc:***@h" in message
    assert SECRET not in message


def test_an_invalid_broker_url_is_a_configuration_error() -> None:
    code = next(c for kind, c in EXIT_CODES.items() if issubclass(InvalidBrokerUrl, kind))
    assert code == 2
