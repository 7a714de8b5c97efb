"""A delivery-limit conflict names the setting that declares that queue's limit."""

from __future__ import annotations

import pytest

from sagaworks.adapters.rabbitmq.errors import TopologyConflict

pytestmark = pytest.mark.unit


def conflict(name: str) -> TopologyConflict:
    return TopologyConflict(
        kind="queue",
        name=name,
        vhost="/",
        argument="x-delivery-limit",
        existing="20",
        wanted="30",
        reply_text="",
    )


def test_the_dead_letter_queue_names_its_own_limit() -> None:
    text = str(conflict("p.sagaworks.dead-letters"))
    assert "SAGAWORKS_DEAD_LETTER_DELIVERY_LIMIT=20" in text


def test_a_saga_queue_names_the_delivery_limit() -> None:
    text = str(conflict("p.sagaworks.order_fulfilment"))
    assert "SAGAWORKS_DELIVERY_LIMIT=20" in text
    assert "DEAD_LETTER" not in text
