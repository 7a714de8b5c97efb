"""Concrete sagas, written against the public `sagaworks` API."""
