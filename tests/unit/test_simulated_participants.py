"""The simulated participants keep the undo-before-do contract of docs/participants-http.md."""

from __future__ import annotations

import pytest

from sagas.order_fulfilment.messages import OrderLine
from sagas.order_fulfilment.ports import (
    ALREADY_UNDONE,
    AuthorisePayment,
    ReleaseStock,
    ReserveStock,
    VoidAuthorisation,
)
from sagas.order_fulfilment.simulation.participants import Ledger, simulated_ports
from sagaworks import BusinessFailure

pytestmark = pytest.mark.unit

AUTHORISE = AuthorisePayment(
    idempotency_key="s:authorise_payment:action",
    order_id="o-1",
    customer_id="c-1",
    amount_cents=100,
    currency="EUR",
)
VOID = VoidAuthorisation(
    idempotency_key="s:authorise_payment:compensation",
    order_id="o-1",
    undoes=AUTHORISE.idempotency_key,
)


async def test_an_action_arriving_after_its_undo_is_refused_and_leaves_no_effect() -> None:
    ledger = Ledger()
    payments = simulated_ports(ledger=ledger)["payments"]

    await payments.void(VOID)  # type: ignore[attr-defined]
    for _ in range(2):  # the first answer is the answer to every repeat
        with pytest.raises(BusinessFailure) as refused:
            await payments.authorise(AUTHORISE)  # type: ignore[attr-defined]
        assert refused.value.reason == ALREADY_UNDONE

    assert ledger.effects[("authorise", "o-1")] == 0
    assert ledger.effects[("void", "o-1")] == 0, "nothing was there to undo"


async def test_an_undo_after_its_action_undoes_it_once() -> None:
    ledger = Ledger()
    inventory = simulated_ports(ledger=ledger)["inventory"]
    reserve = ReserveStock(
        idempotency_key="s:reserve_stock:action",
        order_id="o-1",
        lines=(OrderLine(sku="sku-1", quantity=1),),
    )
    release = ReleaseStock(
        idempotency_key="s:reserve_stock:compensation",
        order_id="o-1",
        undoes=reserve.idempotency_key,
    )

    first = await inventory.reserve(reserve)  # type: ignore[attr-defined]
    await inventory.release(release)  # type: ignore[attr-defined]
    await inventory.release(release)  # type: ignore[attr-defined]
    repeat = await inventory.reserve(reserve)  # type: ignore[attr-defined]

    assert repeat == first, "a repeat of an applied action gets its first answer, no new effect"

    assert (ledger.effects[("reserve", "o-1")], ledger.effects[("release", "o-1")]) == (1, 1)
