"""Order fulfilment: reserve stock, authorise payment, book and await shipment, capture.

The package is the saga definition (`SAGA`); it builds no participants. A
worker names the module that also wires them in `SAGAWORKS_SAGAS`:

- `sagas.order_fulfilment.http_ports`: the participants over HTTP
  (docs/participants-http.md), what a deployment runs;
- `sagas.order_fulfilment.simulation`: simulated participants in process,
  for a local stack that has no real services.
"""

from sagas.order_fulfilment.saga import order_fulfilment

__all__ = ["SAGA", "order_fulfilment"]

SAGA = order_fulfilment
