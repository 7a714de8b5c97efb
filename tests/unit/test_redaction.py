"""Secrets in URLs, wherever they are, never reach output."""

from __future__ import annotations

import pytest

from sagaworks.redaction import is_secret_parameter, mask_url, mask_urls_in

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (
            "postgresql://u@h/db?password=hunter2&sslmode=require",
            "postgresql://u@h/db?password=***&sslmode=require",
        ),
        (
            "postgresql://u:p@h/db?sslmode=verify-full&sslrootcert=/ca.pem&sslpassword=k3y",
            "postgresql://u:***@h/db?sslmode=verify-full&sslrootcert=/ca.pem&sslpassword=***",
        ),
        ("amqps://svc@h/?Password=x&cafile=/ca.pem", "amqps://svc@h/?Password=***&cafile=/ca.pem"),
        ("postgresql://u@h/db?api_token=t", "postgresql://u@h/db?api_token=***"),
        ("postgresql://u:p@h:99999/db?password=x", "postgresql://u:***@h:99999/db"),
    ],
)
def test_secrets_in_the_query_are_masked_too(url: str, masked: str) -> None:
    assert mask_url(url) == masked


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u@h/db?sslmode=verify-full&sslrootcert=/etc/ssl/ca.pem&sslkey=/k.pem",
        "amqps://h/?cafile=/ca.pem&certfile=/c.pem&keyfile=/k.pem",
    ],
)
def test_file_names_are_not_secrets(url: str) -> None:
    assert mask_url(url) == url


@pytest.mark.parametrize(
    ("name", "secret"),
    [("password", True), ("sslpassword", True), ("PASS", True), ("client_secret", True),
     ("key_passphrase", True),
     ("sslkey", False), ("sslrootcert", False), ("user", False)],
)  # fmt: skip
def test_secret_parameter_names(name: str, secret: bool) -> None:
    assert is_secret_parameter(name) is secret


def test_every_url_in_a_text_is_masked() -> None:
    text = (
        'Connection attempt to "amqps://svc:pw1@broker:5671/?password=pw2" failed; '
        "database postgresql://u:pw3@db/x?sslpassword=pw4, retrying"
    )

    masked = mask_urls_in(text)

    assert masked == (
        'Connection attempt to "amqps://svc:***@broker:5671/?password=***" failed; '
        "database postgresql://u:***@db/x?sslpassword=***, retrying"
    )


def test_a_colour_code_after_a_url_is_kept() -> None:
    text = "\x1b[35mpostgresql://u@db/x?password=pw\x1b[0m done"

    assert mask_urls_in(text) == "\x1b[35mpostgresql://u@db/x?password=***\x1b[0m done"


def test_text_without_urls_is_returned_as_it_is() -> None:
    text = "nothing to see: password=here is not a URL"
    assert mask_urls_in(text) is text
