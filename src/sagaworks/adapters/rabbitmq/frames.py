"""Reading deliveries whose properties pamqp would refuse, instead of losing the connection.

pamqp decodes a short string (`message_id`, `type`, a header's name, …) as
strict UTF-8 and a timestamp with `datetime.fromtimestamp`; bytes that are not
UTF-8, or a timestamp past the year 9999, raise while the frame is read, and
aiormq then closes the whole connection. Every consumer on it stops, the
message comes back, and the same frame closes the next connection too. So
anyone who can publish could stall every worker. Here a short string is
decoded with `surrogateescape` (`inbound.py` escapes it and keeps its bytes)
and an unreadable timestamp reads as absent. Long strings need nothing:
pamqp already hands undecodable ones over as bytes.

This replaces two entries of pamqp's decoder tables, process-wide; recheck it
on a pamqp upgrade (the unit tests decode such frames).
"""

from __future__ import annotations

import datetime
import struct

from pamqp import common, decode

__all__ = ["tolerate_undecodable_properties"]

_strict_timestamp = decode.timestamp


def _short_str(value: bytes) -> tuple[int, str]:
    try:
        length = common.Struct.byte.unpack(value[0:1])[0]
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack short string value") from err
    return length + 1, value[1 : length + 1].decode("utf-8", "surrogateescape")


def _timestamp(value: bytes) -> tuple[int, datetime.datetime | None]:
    try:
        return _strict_timestamp(value)
    except (OverflowError, OSError, ValueError) as err:
        if len(value) < 8:
            raise ValueError("Could not unpack timestamp value") from err
        return 8, None


def tolerate_undecodable_properties() -> None:
    """Install the lenient decoders; idempotent."""
    decode.short_str = _short_str
    decode.METHODS["shortstr"] = _short_str
    decode.METHODS["timestamp"] = _timestamp
    decode.TABLE_MAPPING[b"T"] = _timestamp
