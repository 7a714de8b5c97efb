"""The wire every contract backend encodes with, under the contract tests' own prefix."""

from __future__ import annotations

from sagaworks.adapters.rabbitmq.topology import exchange_name
from sagaworks.application.wire import Wire

__all__ = ["PREFIX", "contract_wire"]

PREFIX = "contract."


def contract_wire() -> Wire:
    return Wire(lambda domain: exchange_name(PREFIX, domain))
