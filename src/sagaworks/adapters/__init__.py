"""Adapters: the I/O side of sagaworks, one subpackage per concern.

`postgres` and `rabbitmq` implement the ports declared in
`sagaworks.application` with their technology, `memory` implements the store
and the publisher without I/O (for tests and the harness), `resilience`
implements `PortCaller` (tenacity, pybreaker) and `observability` configures
logging. They are independent of one another, and the inner layers never
import an I/O library: import-linter checks both.
"""
