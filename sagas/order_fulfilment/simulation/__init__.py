"""What the order-fulfilment saga is driven with where there are no real participants.

`participants` (simulated in process), `fake_services` (over HTTP on
loopback), `shop` (order service and warehouse over RabbitMQ) and
`order_mix` (the demo's orders and their expected outcomes) serve the demo,
the bench and the tests.
"""
