"""Passwords in connection URLs: found, masked, and kept out of messages.

Redis URLs (``redis://user:pw@host``, ``?password=``) and PostgreSQL ones
(URLs, or libpq ``key=value`` strings) are checked to be readable before any
connection, because the drivers' own errors quote what they could not read.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from .errors import ConfigError

__all__ = ["check_database_url", "check_redis_url", "masked_url", "url_secrets", "without_secrets"]

_MASK: Final = "***"
# ?password=... in a URL (redis-py and libpq both read it), and password=...
# in a libpq key=value string, quoted or not.
_QUERY_PASSWORD: Final = re.compile(r"([?&]password=)([^&#]*)", re.IGNORECASE)
_CONNINFO_PASSWORD: Final = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
# Any URL's user:password@ in free text, for messages of unknown origin.
_ANY_USERINFO: Final = re.compile(r"([a-z][a-z0-9+.-]*://[^:/@\s]*:)[^\s]*@", re.IGNORECASE)


def _url_password(url: str) -> str | None:
    try:
        netloc = urlsplit(url).netloc
    except ValueError:  # a malformed IPv6 host, say
        return None
    userinfo, at, _host = netloc.rpartition("@")
    return userinfo.partition(":")[2] if at and ":" in userinfo else None


def url_secrets(url: str) -> set[str]:
    """The passwords a Redis or PostgreSQL URL (or libpq ``key=value`` string) holds.

    Each as written and percent-decoded, since an error message may quote either.
    """
    found: set[str] = set()
    if "://" in url:
        password = _url_password(url)
        if password is not None:
            found.add(password)
        found.update(match[2] for match in _QUERY_PASSWORD.finditer(url))
    else:
        found.update(match[2].strip("'") for match in _CONNINFO_PASSWORD.finditer(url))
    found.update([unquote(secret) for secret in found])
    return {secret for secret in found if secret}


def masked_url(url: str) -> str:
    """``url`` with its password (in the user part or the query) shown as ``***``."""
    if "://" not in url:
        return _CONNINFO_PASSWORD.sub(rf"\g<1>{_MASK}", url)
    if _url_password(url) is not None:
        parts = urlsplit(url)
        userinfo, _at, host = parts.netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        url = urlunsplit(parts._replace(netloc=f"{user}:{_MASK}@{host}"))
    return _QUERY_PASSWORD.sub(rf"\g<1>{_MASK}", url)


# Long enough not to stand inside ordinary words by chance: masked wherever it appears.
_LONG_SECRET = 8


def without_secrets(text: str, *urls: str | None) -> str:
    """``text`` with the passwords of ``urls``, and of any URL it quotes, shown as ``***``."""
    for secret in sorted({s for url in urls if url for s in url_secrets(url)}, key=len)[::-1]:
        if len(secret) >= _LONG_SECRET:
            text = text.replace(secret, _MASK)
        else:
            # A short password also spells parts of words ("a" in "Redis"): masked
            # where it stands alone, so the message stays readable.
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", _MASK, text)
    return _ANY_USERINFO.sub(rf"\g<1>{_MASK}@", text)


def check_redis_url(url: str) -> str:
    """``url`` if redis-py can read it; :class:`ConfigError`, without the password, if not.

    TLS options in the query (``ssl_ca_certs``...) need a ``rediss://`` URL:
    on ``redis://`` redis-py would fail only on the first command, with a
    ``TypeError``.
    """
    from redis.connection import parse_url

    shown = masked_url(url)
    try:
        parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        # redis-py's messages name the part at fault; the check is for safety.
        raise ConfigError(f"Redis URL {shown!r}: {without_secrets(str(exc), url)}") from None
    options = [name for name, _value in parse_qsl(urlsplit(url).query) if name.startswith("ssl")]
    if options and not url.lower().startswith("rediss://"):
        raise ConfigError(f"Redis URL {shown!r}: {', '.join(sorted(options))} need a rediss:// URL")
    return url


def check_database_url(url: str) -> str:
    """``url`` if libpq can read it; :class:`ConfigError`, without the password, if not.

    Checked before any connection: libpq's own message quotes the text it
    could not read (a password with a stray ``%``, say), and a pool would log it.
    """
    from psycopg import Error as PsycopgError
    from psycopg.conninfo import conninfo_to_dict

    shown = masked_url(url)
    try:
        conninfo_to_dict(url)
    except PsycopgError as exc:
        reason = " ".join(without_secrets(str(exc), url).split())
        raise ConfigError(f"PostgreSQL URL {shown!r}: {reason}") from None
    password = _url_password(url) if "://" in url else None
    if password is not None and "@" in password:
        # libpq ends the user part at the first "@", Python at the last: the
        # rest of the password would become the host name, quoted in errors.
        raise ConfigError(f"PostgreSQL URL {shown!r}: percent-encode the @ in the password")
    return url
