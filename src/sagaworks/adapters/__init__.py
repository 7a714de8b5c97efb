"""Adapters: the I/O side of sagaworks (PostgreSQL, RabbitMQ, resilience, observability).

Each subpackage implements ports declared in `sagaworks.application` with one
concrete technology, so the inner layers never import an I/O library.
"""
