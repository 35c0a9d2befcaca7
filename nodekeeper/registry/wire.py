"""What a registry sends, made safe: bounded reads, and every exception one failure Kind.

Every byte read from a registry or token service goes through `read_body`, with a cap per
kind of answer: manifests 4 MiB (containerd's limit), token answers and error bodies
64 KiB. Compressed bodies are decompressed here, a bounded piece at a time, so a small
gzip bomb costs no more than its cap. Headers are bounded by h11 (16 KiB per message).

`classify` turns whatever an exchange raised into a Failure: transport errors are
`unreachable` (or `timeout`), protocol and decoding errors, bad URLs, redirect loops and
unicode errors are `invalid`, and anything not foreseen is `invalid` too, logged once per
exception type as a bug. Messages name the host and the kind of trouble; the exception's
own text is used only for errors that cannot carry a request's contents (a refused
connection, a TLS failure); Session scrubs every message of the secrets it knows.
"""

from __future__ import annotations

import re
import ssl
import zlib
from collections.abc import Iterable

import httpx

from nodekeeper import logs
from nodekeeper.failures import Failure, Kind

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_SMALL_BODY = 64 * 1024        # token answers, error bodies
REDACTED = "[redacted]"

_DIGEST = re.compile(r"^(?:sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")
_log = logs.get("registry")
_bugs_seen: set[str] = set()

# Errors whose text is the operating system's or OpenSSL's, never the request's.
_PLAIN_TEXT = (httpx.ConnectError, httpx.ConnectTimeout, ssl.SSLError, ConnectionError)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret (and its escaped forms) replaced."""
    for secret in secrets:
        if len(secret) < 4:
            continue  # too short to tell from ordinary text; never put in messages anyway
        for form in {secret, repr(secret)[1:-1], secret.encode("unicode_escape").decode()}:
            text = text.replace(form, REDACTED)
    return text


def classify(exc: BaseException, where: str) -> Failure:
    """The Failure an exception raised while talking to `where` amounts to. Session, which
    knows the secrets of a request, scrubs what this says."""
    if isinstance(exc, Failure):
        return exc
    inner = getattr(exc, "exceptions", None)  # an exception group: its first member
    if isinstance(inner, tuple | list) and inner and isinstance(inner[0], BaseException):
        return classify(inner[0], where)
    name = type(exc).__name__
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return Failure(Kind.TIMEOUT, f"{where}: no answer in time ({name})")
    if isinstance(exc, _PLAIN_TEXT):
        text = str(exc)[:200]
        return Failure(Kind.UNREACHABLE, f"{where}: {name}" + (f": {text}" if text else ""))
    if isinstance(exc, httpx.TooManyRedirects):
        return Failure(Kind.INVALID, f"{where}: too many redirects (a redirect loop?)")
    if isinstance(exc, httpx.RemoteProtocolError):
        # A dropped connection, or an answer that is not HTTP: either way no answer.
        return Failure(Kind.UNREACHABLE, f"{where}: the connection broke off ({name})")
    if isinstance(exc, httpx.DecodingError):
        return Failure(Kind.INVALID, f"{where}: a body that cannot be decoded ({name})")
    if isinstance(exc, httpx.NetworkError | httpx.ProxyError):
        return Failure(Kind.UNREACHABLE, f"{where}: the connection failed ({name})")
    if isinstance(exc, httpx.LocalProtocolError):
        # Typically a header value that HTTP cannot carry: its text would show the value.
        return Failure(Kind.INVALID, f"{where}: a request could not be sent as HTTP ({name})")
    if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol | UnicodeError):
        return Failure(Kind.INVALID, f"{where}: an unusable address or name ({name})")
    if name not in _bugs_seen:
        _bugs_seen.add(name)
        _log.error("unexpected error talking to a registry; treated as an invalid answer",
                   where=where, type=name)
    return Failure(Kind.INVALID, f"{where}: unexpected {name}")


def valid_digest(digest: str) -> bool:
    """sha256 or sha512 in canonical form: what containerd accepts and records."""
    return bool(_DIGEST.match(digest))


def header_safe(value: str) -> bool:
    """Whether `value` can be sent as an HTTP header value as it is."""
    return value.isascii() and value.isprintable()


async def read_body(response: httpx.Response, limit: int, what: str) -> bytes:
    """The whole body of a streamed response, at most `limit` bytes after decompression;
    Failure(invalid) beyond it. Closes the response."""
    if response.is_stream_consumed:  # built in memory (tests' stand-ins): already read
        if len(response.content) > limit:
            raise Failure(Kind.INVALID, f"{what}: larger than {limit} bytes")
        return response.content
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("gzip", "x-gzip"):
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        inflater = zlib.decompressobj()
    elif encoding in ("", "identity"):
        inflater = None
    else:
        await response.aclose()
        raise Failure(Kind.INVALID, f"{what}: unsupported Content-Encoding {encoding[:40]!r}")
    chunks: list[bytes] = []
    size = 0
    try:
        async for raw in response.aiter_raw():
            pending = raw
            while pending:
                if inflater is None:
                    piece, pending = pending, b""
                else:
                    # Never more than what is still allowed (+1, to see the limit crossed).
                    piece = inflater.decompress(pending, limit - size + 1)
                    pending = inflater.unconsumed_tail
                size += len(piece)
                if size > limit:
                    raise Failure(Kind.INVALID, f"{what}: larger than {limit} bytes")
                chunks.append(piece)
    except zlib.error:
        raise Failure(Kind.INVALID, f"{what}: a broken {encoding} body") from None
    finally:
        await response.aclose()
    return b"".join(chunks)
