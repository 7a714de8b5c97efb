"""Finding each port's policy where it is declared: on the port adapter.

`PortPolicy` itself lives in the application layer (sagas declare it through
the public API); an adapter declares its policy as a `policy` attribute.
"""

from __future__ import annotations

from collections.abc import Mapping

from sagaworks.application.config import PortPolicy

__all__ = ["declared_policies"]


def declared_policies(ports: Mapping[str, object]) -> dict[str, PortPolicy]:
    """The `policy` each port adapter declares, by port name; adapters without one are left out."""
    return {
        name: policy
        for name, port in ports.items()
        if isinstance(policy := getattr(port, "policy", None), PortPolicy)
    }
