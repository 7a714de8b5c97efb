"""Secrets out of URLs before they are printed or logged.

A URL can carry a secret in two places: the password of its userinfo
(`postgresql://user:secret@host/db`) and a query parameter
(`?password=secret`, `?sslpassword=secret`, as libpq accepts). Both are
replaced by `***` wherever sagaworks shows a URL: `config show`, error
lines, and every log line (the log pipeline masks every URL it renders).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

__all__ = ["MASK", "is_secret_parameter", "mask_url", "mask_urls_in"]

MASK = "***"

_SECRET_WORDS = ("password", "passwd", "passphrase", "secret", "token")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s\"'<>\\\x00-\x1f\x7f]+")
"""A URL ends at a space, a quote, an angle bracket, a backslash or a control character
(a terminal colour code)."""


def is_secret_parameter(name: str) -> bool:
    """Whether a URL query parameter named `name` carries a secret (`password`, `sslpassword`)."""
    lowered = name.lower()
    return lowered == "pass" or any(word in lowered for word in _SECRET_WORDS)


def _mask_query(query: str) -> str:
    if not query:
        return query
    pairs = parse_qsl(query, keep_blank_values=True)
    if not any(is_secret_parameter(name) for name, _ in pairs):
        return query
    return "&".join(
        f"{quote(name, safe='')}={MASK if is_secret_parameter(name) else quote(value, safe='/:')}"
        for name, value in pairs
    )


def mask_url(url: str) -> str:
    """Return `url` with its password and any secret query parameter replaced by `***`."""
    try:
        parts = urlsplit(url)
        password = parts.password
        port = parts.port
    except ValueError:
        return _mask_unparsable(url)
    netloc = parts.netloc
    if password is not None:
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{parts.username or ''}:{MASK}@{host}" + (f":{port}" if port else "")
    query = _mask_query(parts.query)
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _mask_unparsable(url: str) -> str:
    """A URL `urlsplit` rejects (a bad port, say) still loses anything after `:` in userinfo."""
    scheme, _, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return f"{scheme}://{host.split('?', 1)[0]}" if at else url.split("?", 1)[0]
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:{MASK}@{host.split('?', 1)[0]}"


def mask_urls_in(text: str) -> str:
    """`text` with every URL in it masked as `mask_url` does."""
    if "://" not in text:
        return text
    return _URL.sub(_mask_match, text)


def _mask_match(match: re.Match[str]) -> str:
    """Punctuation that ends a sentence is not part of the URL it follows."""
    found = match.group(0)
    url = found.rstrip(".,;:)]}")
    return mask_url(url) + found[len(url) :]
