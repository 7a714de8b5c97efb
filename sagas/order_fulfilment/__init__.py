"""Order fulfilment: reserve stock, authorise payment, book and await shipment, capture."""

from sagas.order_fulfilment.saga import order_fulfilment

__all__ = ["order_fulfilment"]
