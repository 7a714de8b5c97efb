"""`stable_id`: the same event gets the same id on every re-send, a different one never does."""

from __future__ import annotations

import uuid

import pytest

from sagas.order_fulfilment.messages import OrderCancellationRequested, OrderPlaced
from sagaworks.client import stable_id

pytestmark = pytest.mark.unit


def test_the_same_type_and_key_give_the_same_id_forever() -> None:
    assert stable_id(OrderPlaced, "o-42") == stable_id("order.placed", "o-42")
    # Pinned: a change of namespace or layout would break re-sends across releases.
    assert stable_id(OrderPlaced, "o-42") == "2324b3d6-ca08-53ab-b391-5080cc8674fc"
    assert uuid.UUID(stable_id(OrderPlaced, "o-42")).version == 5


def test_another_type_or_key_gives_another_id() -> None:
    ids = {
        stable_id(OrderPlaced, "o-42"),
        stable_id(OrderPlaced, "o-43"),
        stable_id(OrderCancellationRequested, "o-42"),
        stable_id(OrderPlaced, "o-4", "2"),
    }
    assert len(ids) == 4


def test_an_empty_key_is_refused() -> None:
    with pytest.raises(ValueError, match="business key"):
        stable_id(OrderPlaced)
    with pytest.raises(ValueError, match="business key"):
        stable_id(OrderPlaced, "o-1", "")
