"""Order fulfilment: reserve stock, authorise payment, book and await shipment, capture.

`SAGA` and `build_ports()` are what a worker loads (`SAGAWORKS_SAGAS`).
"""

from sagas.order_fulfilment.saga import order_fulfilment
from sagas.order_fulfilment.simulated import simulated_ports

__all__ = ["SAGA", "build_ports", "order_fulfilment"]

SAGA = order_fulfilment


def build_ports() -> dict[str, object]:
    """The simulated participants; a deployment replaces this with its real adapters."""
    return simulated_ports()
