"""The HTTP port adapters: what they send and how each answer maps, on httpx's mock transport."""

from __future__ import annotations

import json

import httpx
import pytest

from sagas.order_fulfilment.http_ports import (
    IDEMPOTENCY_HEADER,
    PAYMENTS_POLICY,
    HttpPayments,
    HttpSettings,
    RequestRejected,
    http_ports,
)
from sagas.order_fulfilment.ports import (
    ALREADY_UNDONE,
    Authorisation,
    AuthorisePayment,
    VoidAuthorisation,
)
from sagaworks import BusinessFailure, PortUnavailable

pytestmark = pytest.mark.unit

AUTHORISE = AuthorisePayment(
    idempotency_key="saga:authorise_payment:action",
    order_id="o-1",
    customer_id="c-1",
    amount_cents=4_250,
    currency="EUR",
)


def payments(handler: httpx.MockTransport) -> HttpPayments:
    client = httpx.AsyncClient(base_url="http://payments.test", transport=handler)
    return HttpPayments(client, PAYMENTS_POLICY)


async def test_the_idempotency_key_goes_in_the_header_and_the_command_in_the_body() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json={"authorisation_id": "auth-1"})

    result = await payments(httpx.MockTransport(answer)).authorise(AUTHORISE)

    assert result == Authorisation(authorisation_id="auth-1")
    (request,) = seen
    assert (request.method, request.url.path) == ("POST", "/authorisations")
    assert request.headers[IDEMPOTENCY_HEADER] == "saga:authorise_payment:action"
    assert json.loads(request.content) == {
        "order_id": "o-1",
        "customer_id": "c-1",
        "amount_cents": 4_250,
        "currency": "EUR",
    }


async def test_a_decline_is_a_business_failure_with_the_reason_the_service_gives() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(402, json={"error": "card_expired", "detail": "12/29"})

    with pytest.raises(BusinessFailure) as refused:
        await payments(httpx.MockTransport(answer)).authorise(AUTHORISE)

    assert (refused.value.reason, refused.value.detail) == ("card_expired", "12/29")


async def test_a_decline_without_a_body_gets_the_endpoints_reason() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(402, text="no")

    with pytest.raises(BusinessFailure) as refused:
        await payments(httpx.MockTransport(answer)).authorise(AUTHORISE)

    assert refused.value.reason == "payment_declined"


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 425, 429])
async def test_server_errors_and_throttling_are_transient(status: int) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status)

    with pytest.raises(PortUnavailable, match=f"answered {status}"):
        await payments(httpx.MockTransport(answer)).authorise(AUTHORISE)


@pytest.mark.parametrize(
    "error",
    [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("x")],
)
async def test_timeouts_and_connection_errors_are_transient(error: httpx.HTTPError) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        raise error

    with pytest.raises(PortUnavailable):
        await payments(httpx.MockTransport(answer)).authorise(AUTHORISE)


async def test_a_success_with_an_unexpected_body_is_transient() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(201, json={"id": "auth-1"})

    with pytest.raises(PortUnavailable, match="unexpected body"):
        await payments(httpx.MockTransport(answer)).authorise(AUTHORISE)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409])
async def test_other_client_errors_are_rejected_requests_neither_business_nor_transient(
    status: int,
) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"error": "bad_request"})

    with pytest.raises(RequestRejected, match=str(status)):
        await payments(httpx.MockTransport(answer)).authorise(AUTHORISE)


async def test_an_undo_names_what_it_undoes() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"undone": False})

    await payments(httpx.MockTransport(answer)).void(
        VoidAuthorisation(idempotency_key="k-void", order_id="o-1", undoes="k-auth")
    )

    assert seen[0].url.path == "/authorisations/voids"
    assert json.loads(seen[0].content) == {"order_id": "o-1", "undoes": "k-auth"}


async def test_each_port_declares_its_policy_with_the_timeout_from_settings() -> None:
    ports = http_ports(HttpSettings(payments_timeout_s=1.5))
    try:
        assert ports["payments"].policy.call_timeout_s == 1.5
        assert ports["payments"].policy.delayed_retries == PAYMENTS_POLICY.delayed_retries
        assert {name: p.policy.call_timeout_s for name, p in ports.items()}["inventory"] == 2.0
    finally:
        for port in ports.values():
            await port.aclose()


async def test_an_action_refused_because_its_key_was_undone_is_a_business_failure() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(410, json={"error": "already_undone", "detail": "voided first"})

    with pytest.raises(BusinessFailure) as refused:
        await payments(httpx.MockTransport(answer)).authorise(AUTHORISE)

    assert refused.value.reason == ALREADY_UNDONE
