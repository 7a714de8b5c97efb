"""The three participants over HTTP (httpx), each with the policy sagaworks calls it under.

Every request is a JSON `POST` carrying the step's idempotency key in the
`Idempotency-Key` header; docs/participants-http.md documents each endpoint.
Answers are mapped to what the saga engine understands:

- 2xx: success, the body parsed into the port's result model;
- 402, 409, 422 (as each endpoint defines them): `BusinessFailure` with the
  `error` the body names: not retried, the saga compensates at once;
- 410 to an action that has an undo: the action's key was undone before the
  action arrived, and the participant refused it (`BusinessFailure`,
  `already_undone`): it did not happen, so there is nothing to compensate;
- 408, 425, 429, 5xx, timeouts, refused or broken connections, and a 2xx
  whose body is not the documented JSON: `PortUnavailable`, retried under
  the port's policy and counted by its circuit breaker;
- any other 4xx: `RequestRejected`. The request itself is wrong (a contract
  or configuration error), retrying cannot help, and it is no business
  answer: the delivery fails and the queue's delivery limit dead-letters it.

Base URLs and timeouts come from `ORDER_FULFILMENT_HTTP_<FIELD>`
(`HttpSettings`). A worker talks to real participants with
`SAGAWORKS_SAGAS='["sagas.order_fulfilment.http_ports"]'`: this module
exposes `SAGA` and `build_ports()` as `sagas.order_fulfilment.simulation` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from sagas.order_fulfilment.ports import (
    ALREADY_UNDONE,
    Authorisation,
    AuthorisePayment,
    BookShipment,
    CancelShipment,
    CapturePayment,
    PaymentCapture,
    ReleaseStock,
    ReserveStock,
    ShipmentBooking,
    StockReservation,
    VoidAuthorisation,
)
from sagas.order_fulfilment.saga import order_fulfilment
from sagaworks import BusinessFailure, PortPolicy, PortUnavailable

__all__ = [
    "IDEMPOTENCY_HEADER",
    "INVENTORY_POLICY",
    "PAYMENTS_POLICY",
    "SAGA",
    "SHIPPING_POLICY",
    "HttpInventory",
    "HttpPayments",
    "HttpSettings",
    "HttpShipping",
    "RequestRejected",
    "build_ports",
    "http_ports",
]

SAGA = order_fulfilment

IDEMPOTENCY_HEADER = "Idempotency-Key"

_UNDONE_STATUS = 410

R = TypeVar("R", bound=BaseModel)

INVENTORY_POLICY = PortPolicy(call_timeout_s=2.0, delayed_retries=6, breaker_reset_s=15.0)
"""Stock is local and quick: a short deadline, a quick trial after an outage."""
PAYMENTS_POLICY = PortPolicy(
    call_timeout_s=5.0,
    immediate_attempts=2,
    delayed_retries=8,
    delayed_max_s=120.0,
    breaker_reset_s=30.0,
)
"""A payment provider is slow and rate-limited: fewer immediate tries, more patience."""
SHIPPING_POLICY = PortPolicy(call_timeout_s=3.0, delayed_retries=6, breaker_reset_s=20.0)
"""The carrier's booking API: in between."""

_TRANSIENT_4XX = frozenset({408, 425, 429})


class RequestRejected(Exception):
    """The participant refused the request as malformed or unauthorised: fix, then replay."""


class HttpSettings(BaseSettings):
    """Where the participants are: `ORDER_FULFILMENT_HTTP_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="ORDER_FULFILMENT_HTTP_", frozen=True)

    inventory_url: str = Field(default="http://127.0.0.1:8081", description="Inventory base URL.")
    payments_url: str = Field(default="http://127.0.0.1:8082", description="Payments base URL.")
    shipping_url: str = Field(default="http://127.0.0.1:8083", description="Shipping base URL.")
    inventory_timeout_s: float = Field(default=INVENTORY_POLICY.call_timeout_s, gt=0)
    payments_timeout_s: float = Field(default=PAYMENTS_POLICY.call_timeout_s, gt=0)
    shipping_timeout_s: float = Field(default=SHIPPING_POLICY.call_timeout_s, gt=0)
    connect_timeout_s: float = Field(
        default=1.0, gt=0, description="Deadline for opening a connection (part of each call's)."
    )


class _Undone(BaseModel):
    undone: bool


class _Participant:
    """One participant's client: posts commands and maps the answers (see module docstring)."""

    def __init__(self, client: httpx.AsyncClient, policy: PortPolicy) -> None:
        self._client = client
        self.policy = policy
        """How sagaworks calls this port; `bootstrap` reads it from here."""

    async def aclose(self) -> None:
        """Close the HTTP client and its connections; the system running the port calls this."""
        await self._client.aclose()

    @property
    def is_closed(self) -> bool:
        return self._client.is_closed

    async def _post(
        self,
        path: str,
        key: str,
        command: BaseModel,
        result: type[R],
        business: Mapping[int, str] | None = None,
    ) -> R:
        """POST `command` (its key in the header); map the answer, `business` by status."""
        body = command.model_dump(mode="json", exclude={"idempotency_key"})
        where = f"POST {self._client.base_url.join(path)}"
        try:
            response = await self._client.post(path, json=body, headers={IDEMPOTENCY_HEADER: key})
        except httpx.TimeoutException as error:
            raise PortUnavailable(f"{where} timed out ({type(error).__name__})") from error
        except httpx.TransportError as error:
            raise PortUnavailable(f"{where} unreachable: {error!r}") from error
        status = response.status_code
        if business and status in business:
            raise BusinessFailure(_error_of(response) or business[status], _detail_of(response))
        if status >= 500 or status in _TRANSIENT_4XX:
            raise PortUnavailable(f"{where} answered {status}")
        if status >= 400:
            raise RequestRejected(f"{where} answered {status}: {response.text[:300]}")
        try:
            return result.model_validate_json(response.content)
        except ValidationError as error:
            raise PortUnavailable(f"{where} answered {status} with an unexpected body") from error


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _error_of(response: httpx.Response) -> str | None:
    error = _json(response).get("error")
    return error if isinstance(error, str) and error else None


def _detail_of(response: httpx.Response) -> str:
    detail = _json(response).get("detail")
    return detail if isinstance(detail, str) else ""


class HttpInventory(_Participant):
    async def reserve(self, command: ReserveStock) -> StockReservation:
        return await self._post(
            "/reservations",
            command.idempotency_key,
            command,
            StockReservation,
            {409: "out_of_stock", _UNDONE_STATUS: ALREADY_UNDONE},
        )

    async def release(self, command: ReleaseStock) -> None:
        await self._post("/reservations/releases", command.idempotency_key, command, _Undone)


class HttpPayments(_Participant):
    async def authorise(self, command: AuthorisePayment) -> Authorisation:
        return await self._post(
            "/authorisations",
            command.idempotency_key,
            command,
            Authorisation,
            {402: "payment_declined", _UNDONE_STATUS: ALREADY_UNDONE},
        )

    async def void(self, command: VoidAuthorisation) -> None:
        await self._post("/authorisations/voids", command.idempotency_key, command, _Undone)

    async def capture(self, command: CapturePayment) -> PaymentCapture:
        return await self._post("/captures", command.idempotency_key, command, PaymentCapture)


class HttpShipping(_Participant):
    async def book(self, command: BookShipment) -> ShipmentBooking:
        return await self._post(
            "/shipments",
            command.idempotency_key,
            command,
            ShipmentBooking,
            {422: "address_unserviceable", _UNDONE_STATUS: ALREADY_UNDONE},
        )

    async def cancel(self, command: CancelShipment) -> None:
        await self._post("/shipments/cancellations", command.idempotency_key, command, _Undone)


def _client(base_url: str, timeout_s: float, connect_timeout_s: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(timeout_s, connect=min(connect_timeout_s, timeout_s)),
    )


def http_ports(
    settings: HttpSettings, policies: Mapping[str, PortPolicy] | None = None
) -> dict[str, _Participant]:
    """The three ports by name; `policies` replaces the declared ones (tests tune them)."""
    chosen = {
        "inventory": replace(INVENTORY_POLICY, call_timeout_s=settings.inventory_timeout_s),
        "payments": replace(PAYMENTS_POLICY, call_timeout_s=settings.payments_timeout_s),
        "shipping": replace(SHIPPING_POLICY, call_timeout_s=settings.shipping_timeout_s),
        **(policies or {}),
    }
    connect = settings.connect_timeout_s
    return {
        "inventory": HttpInventory(
            _client(settings.inventory_url, chosen["inventory"].call_timeout_s, connect),
            chosen["inventory"],
        ),
        "payments": HttpPayments(
            _client(settings.payments_url, chosen["payments"].call_timeout_s, connect),
            chosen["payments"],
        ),
        "shipping": HttpShipping(
            _client(settings.shipping_url, chosen["shipping"].call_timeout_s, connect),
            chosen["shipping"],
        ),
    }


def build_ports() -> dict[str, object]:
    """What a worker loads from this module: the HTTP participants named by the environment."""
    return dict(http_ports(HttpSettings()))
