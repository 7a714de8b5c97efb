"""An eager step's lease outlasts its port's longest delivery, unless one is configured."""

from __future__ import annotations

import pytest

from sagaworks.application.config import PortPolicy
from sagaworks.application.eager import LEASE_FLOOR_S, leases

SLOW = PortPolicy(call_timeout_s=20.0, immediate_attempts=3, immediate_wait_max_s=1.0)
"""Three attempts of up to 20 s with up to 1 s between them: 62 s."""


def test_the_longest_delivery_is_every_attempt_to_its_deadline_and_the_waits_between() -> None:
    assert SLOW.longest_delivery_s == pytest.approx(62.0)
    assert PortPolicy(call_timeout_s=2.0, immediate_attempts=1).longest_delivery_s == 2.0


def test_a_slow_port_gets_a_lease_past_its_longest_delivery_and_the_commit() -> None:
    lease_for = leases({"shipping": SLOW}, fixed_s=None, commit_s=10.0)

    assert lease_for("shipping") == pytest.approx(72.0)


def test_fast_ports_and_ports_without_a_policy_keep_the_floor() -> None:
    lease_for = leases({"payments": PortPolicy(call_timeout_s=1.0)}, fixed_s=None, commit_s=10.0)

    assert lease_for("payments") == LEASE_FLOOR_S
    default = PortPolicy().longest_delivery_s + 10.0
    assert lease_for("inventory") == max(LEASE_FLOOR_S, default)


def test_a_configured_lease_applies_to_every_port_as_it_is() -> None:
    lease_for = leases({"shipping": SLOW}, fixed_s=2.0, commit_s=10.0)

    assert lease_for("shipping") == 2.0
    assert lease_for("inventory") == 2.0
