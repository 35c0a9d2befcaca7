"""A fault-injecting HTTP reverse proxy on loopback, to put in front of a ``Registry``.

Clients (containerd, nodekeeper) are pointed at ``proxy.host`` instead of the registry's;
the proxy forwards to the registry and, when told to, answers with a chosen status, never
answers, forwards late, answers late, tampers with response headers, or refuses connections.

Which requests a fault applies to: by default every request, ``GET /v2/`` included (a
broken upstream is broken for its ping too); narrow it with ``path_contains=`` (a substring
of the path, without the query: ``"/manifests/"``, ``"/blobs/"``, ``"/v2/app/"``) and
``method=``.

Forwarding: the ``Host`` header is set to the target's host so the registry builds its
URLs for itself, and a ``Location`` header pointing at the target is rewritten to point at
the proxy (blob uploads keep going through it). ``WWW-Authenticate`` is passed unchanged:
a Basic realm is only a name, and a Bearer realm names the token server, which clients
contact directly.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal, NamedTuple
from urllib.parse import urlsplit

from tests.harness._proc import Service, wait_for_count
from tests.harness.registry import HARNESS_USER_AGENT

_CHUNK = 64 * 1024
_JOIN_TIMEOUT = 5.0
_POLL = 0.02  # how often a held request looks for a switch while watching its client
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)
# Not an HTTP status: the proxy took the request and never answered it (``hang()``).
NO_RESPONSE = 0


class ProxyRequest(NamedTuple):
    """One request as the proxy saw it; ``status`` is what the client got (``NO_RESPONSE``
    for a hung request, 502/504 when the target could not be reached)."""

    method: str
    path: str
    status: int


def oci_error(code: str, message: str) -> bytes:
    """A distribution-style error body: ``{"errors": [{"code": ..., "message": ...}]}``."""
    return json.dumps({"errors": [{"code": code, "message": message, "detail": None}]}).encode()


@dataclass(frozen=True)
class _Match:
    path_contains: str | None
    method: str | None

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and method != self.method.upper():
            return False
        return self.path_contains is None or self.path_contains in path


@dataclass
class _Action:
    kind: Literal["respond", "hang", "delay", "late"]
    match: _Match
    remaining: int | None  # None: until switched
    status: int = 0
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    seconds: float = 0.0  # hang: the safety bound; delay, late: the delay


@dataclass(frozen=True)
class _HeaderRule:
    match: _Match
    drop: frozenset[str]
    set: tuple[tuple[str, str], ...]


@dataclass
class _Span:
    """One request from when its line was read until its handler was done with it (a
    held request: until its client hung up, at the latest)."""

    method: str
    path: str
    user_agent: str
    start: float
    end: float | None = None


@dataclass(frozen=True)
class _Logged:
    method: str
    path: str
    status: int
    user_agent: str


class FaultProxy(Service):
    """A reverse proxy from ``url`` (http://127.0.0.1:PORT) to ``target_url``.

    It serves from construction until ``close()``; ``refuse()`` / ``start()`` toggle
    listening on the same port. Behaviour switches (``passthrough``, ``respond``, ``hang``,
    ``delay``) replace each other; header rules (``drop_headers``, ``set_headers``) add up
    and apply to forwarded responses; ``passthrough()`` clears everything.
    """

    def __init__(
        self,
        target_url: str,
        *,
        port: int = 0,
        verify: ssl.SSLContext | bool = True,
        upstream_timeout: float = 30.0,
        idle_timeout: float = 60.0,
    ) -> None:
        target = urlsplit(target_url.rstrip("/"))
        if target.scheme not in ("http", "https") or not target.hostname:
            raise ValueError(f"target must be an http(s) URL, not {target_url!r}")
        self.target_url = f"{target.scheme}://{target.netloc}"
        self.target_host = target.netloc
        self._target_scheme = target.scheme
        self._target_hostname = target.hostname
        self._target_port = target.port or (443 if target.scheme == "https" else 80)
        self._ssl_context: ssl.SSLContext | None = None
        if target.scheme == "https":
            if isinstance(verify, ssl.SSLContext):
                self._ssl_context = verify
            elif verify:
                self._ssl_context = ssl.create_default_context()
            else:
                self._ssl_context = ssl._create_unverified_context()
        self.upstream_timeout = upstream_timeout
        self.idle_timeout = idle_timeout

        self._cond = threading.Condition()
        self._action: _Action | None = None
        self._header_rules: list[_HeaderRule] = []
        self._epoch = 0  # bumped by every switch: hung and delayed requests watch it
        self._log: list[_Logged] = []
        self._spans: list[_Span] = []
        self._sockets: set[socket.socket] = set()  # client and upstream connections
        self._threads: list[threading.Thread] = []
        self._server: _ProxyServer | None = None
        self._serve_thread: threading.Thread | None = None
        self._closed = False

        self.port = port
        self._listen()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"

    # -- lifecycle -----------------------------------------------------------------------

    def _listen(self) -> None:
        server = _ProxyServer(self, ("127.0.0.1", self.port))
        self.port = server.server_address[1]
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fault-proxy-{self.port}",
            daemon=True,
        )
        self._server, self._serve_thread = server, thread
        thread.start()

    @property
    def listening(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Listen again on the same port after ``refuse()``. No-op while listening."""
        if self._closed:
            raise RuntimeError("the proxy is closed")
        if self._server is None:
            self._listen()

    def refuse(self) -> None:
        """Close the listening socket (new connections are refused) and cut every open
        connection, in-flight requests included. ``start()`` undoes it."""
        server, thread = self._server, self._serve_thread
        self._server = self._serve_thread = None
        self._bump_epoch()
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=_JOIN_TIMEOUT)
        self._cut_connections()

    def close(self) -> None:
        """Stop listening, drop every connection and end every thread. Safe to call twice."""
        self._closed = True
        self.refuse()


    def _cut_connections(self) -> None:
        """Shut down every tracked socket until every handler thread has ended. Rounds,
        because a thread that was just starting may register its socket after a round."""
        deadline = time.monotonic() + _JOIN_TIMEOUT
        while True:
            with self._cond:
                sockets = list(self._sockets)
                self._threads = [t for t in self._threads if t.is_alive()]
                threads = list(self._threads)
            if not threads:
                return
            if time.monotonic() > deadline:
                names = [t.name for t in threads]
                raise RuntimeError(f"proxy threads still running after {_JOIN_TIMEOUT}s: {names}")
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            for t in threads:
                t.join(timeout=0.05)

    # -- behaviour -----------------------------------------------------------------------

    def _bump_epoch(self) -> None:
        with self._cond:
            self._epoch += 1
            self._cond.notify_all()

    def _set_action(self, action: _Action | None) -> None:
        with self._cond:
            self._action = action
            self._epoch += 1
            self._cond.notify_all()

    def passthrough(self) -> None:
        """Forward everything unchanged (the initial state): clears the current switch and
        every header rule, and releases hung requests (their connections are dropped)."""
        with self._cond:
            self._header_rules.clear()
        self._set_action(None)

    def respond(
        self,
        status: int,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        *,
        path_contains: str | None = None,
        method: str | None = None,
        times: int | None = None,
    ) -> None:
        """Answer matching requests with ``status``, ``headers`` and ``body`` without asking
        the target (e.g. ``respond(429, {"Retry-After": "1"})``; see ``oci_error``).
        Content-Length is added; Content-Type defaults to application/json for a non-empty
        body. With ``times``, only the next ``times`` matching requests are answered so."""
        hdrs = dict(headers or {})
        lower = {k.lower() for k in hdrs}
        if body and "content-type" not in lower:
            hdrs["Content-Type"] = "application/json"
        if "content-length" not in lower:
            hdrs["Content-Length"] = str(len(body))
        self._set_action(
            _Action(
                "respond",
                _Match(path_contains, method),
                times,
                status=status,
                headers=tuple(hdrs.items()),
                body=body,
            )
        )

    def hang(
        self,
        *,
        path_contains: str | None = None,
        method: str | None = None,
        times: int | None = None,
        max_seconds: float = 300.0,
    ) -> None:
        """Take matching requests and never answer. A hung request is released, by
        dropping its connection without a response, at the next switch (``passthrough()``,
        ``respond()``, ...), ``refuse()``, ``close()``, after ``max_seconds``, or when its
        client hangs up."""
        self._set_action(_Action("hang", _Match(path_contains, method), times, seconds=max_seconds))

    def delay(
        self,
        seconds: float,
        *,
        path_contains: str | None = None,
        method: str | None = None,
        times: int | None = None,
    ) -> None:
        """Forward matching requests after ``seconds`` (sooner if switched meanwhile); a
        request whose client hangs up meanwhile ends there, not forwarded."""
        self._set_action(_Action("delay", _Match(path_contains, method), times, seconds=seconds))

    def answer_late(
        self,
        seconds: float,
        *,
        path_contains: str | None = None,
        method: str | None = None,
        times: int | None = None,
    ) -> None:
        """Forward matching requests at once, but hold the answer for ``seconds`` (sooner
        if switched meanwhile, or if the client hangs up): the registry answered as of
        when it was asked."""
        self._set_action(_Action("late", _Match(path_contains, method), times, seconds=seconds))

    def drop_headers(
        self,
        names: Iterable[str],
        *,
        path_contains: str | None = None,
        method: str | None = None,
    ) -> None:
        """Remove these headers (any case) from matching forwarded responses."""
        rule = _HeaderRule(_Match(path_contains, method), frozenset(n.lower() for n in names), ())
        with self._cond:
            self._header_rules.append(rule)

    def set_headers(
        self,
        headers: Mapping[str, str],
        *,
        path_contains: str | None = None,
        method: str | None = None,
    ) -> None:
        """Add or replace headers on matching forwarded responses."""
        rule = _HeaderRule(
            _Match(path_contains, method),
            frozenset(n.lower() for n in headers),
            tuple(headers.items()),
        )
        with self._cond:
            self._header_rules.append(rule)

    def _decide(self, method: str, path: str) -> tuple[_Action | None, int]:
        """The action for this request (consuming one of its ``times``) and the epoch."""
        with self._cond:
            action = self._action
            epoch = self._epoch
            if action is None or not action.match.matches(method, path):
                return None, epoch
            if action.remaining is not None:
                action.remaining -= 1
                if action.remaining <= 0:
                    self._action = None  # not a switch: the epoch stays
            return action, epoch

    def _wait_switch(self, epoch: int, seconds: float,
                     client: socket.socket | None = None) -> bool:
        """Block until the next switch (True) or for ``seconds`` (False); with ``client``,
        also until that client hangs up (False)."""
        deadline = time.monotonic() + seconds
        if client is not None:
            return self._wait_switch_or_hang_up(epoch, deadline, client)
        with self._cond:
            while self._epoch == epoch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def _wait_switch_or_hang_up(self, epoch: int, deadline: float,
                                client: socket.socket) -> bool:
        # select() sees the client's FIN at once, so a span ends before the client's next
        # request can start; a switch is seen within one poll.
        while True:
            with self._cond:
                if self._epoch != epoch:
                    return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                readable, _, _ = select.select([client], [], [], min(remaining, _POLL))
                if readable and not client.recv(1, socket.MSG_PEEK):
                    return False
            except OSError:
                return False
            if readable:  # bytes of a next request: not a hang-up; do not spin on them
                time.sleep(_POLL)

    def _rewrite_headers(
        self, method: str, path: str, headers: list[tuple[str, str]]
    ) -> list[tuple[str, str]]:
        out = []
        for name, value in headers:
            if name.lower() == "location" and value.startswith(self.target_url):
                value = self.url + value[len(self.target_url) :]
            out.append((name, value))
        with self._cond:
            rules = [r for r in self._header_rules if r.match.matches(method, path)]
        for rule in rules:
            out = [(n, v) for n, v in out if n.lower() not in rule.drop]
            out.extend(rule.set)
        return out

    # -- observation ---------------------------------------------------------------------

    def _record(self, method: str, path: str, status: int, user_agent: str) -> None:
        with self._cond:
            self._log.append(_Logged(method, path, status, user_agent))

    def requests(
        self,
        method: str | None = None,
        path_contains: str | None = None,
        *,
        status: int | None = None,
        include_harness: bool = False,
    ) -> list[ProxyRequest]:
        """Requests seen since ``clear()``, in the order their status was decided (as the
        response head went out, or when a request was hung). As with ``Registry.requests``
        the harness's own traffic (User-Agent ``nodekeeper-harness*``) is left out unless
        ``include_harness``."""
        with self._cond:
            log = list(self._log)
        return [
            ProxyRequest(e.method, e.path, e.status)
            for e in log
            if (include_harness or not e.user_agent.startswith(HARNESS_USER_AGENT))
            and (method is None or e.method == method.upper())
            and (path_contains is None or path_contains in e.path)
            and (status is None or e.status == status)
        ]

    def peak_concurrent(
        self,
        method: str | None = None,
        path_contains: str | None = None,
        *,
        include_harness: bool = False,
        handover: float = 0.0,
    ) -> int:
        """The most matching requests ever in progress at once since ``clear()``. A hung or
        held request counts until it is released or its client hangs up. With ``handover``,
        a request counts as ended that much earlier: the client that gave up on it may
        start the next before this proxy has seen the first one's connection close."""
        with self._cond:
            spans = [
                (s.start, s.end) for s in self._spans
                if (include_harness or not s.user_agent.startswith(HARNESS_USER_AGENT))
                and (method is None or s.method == method.upper())
                and (path_contains is None or path_contains in s.path)
            ]
        # An end sorts before a start at the same instant: the two did not overlap.
        edges = sorted([(start, 1) for start, _ in spans]
                       + [(max(start, end - handover), -1) for start, end in spans
                          if end is not None])
        peak = now = 0
        for _, step in edges:
            now += step
            peak = max(peak, now)
        return peak

    def wait_for_requests(
        self,
        count: int,
        method: str | None = None,
        path_contains: str | None = None,
        *,
        status: int | None = None,
        timeout: float = 5.0,
    ) -> list[ProxyRequest]:
        """Poll until at least ``count`` matching requests are logged; return them all."""
        return wait_for_count(
            lambda: self.requests(method, path_contains, status=status), count, timeout)

    def clear(self) -> None:
        with self._cond:
            self._log.clear()
            self._spans = [s for s in self._spans if s.end is None]

    # -- bookkeeping for the server ------------------------------------------------------

    def _open_span(self, method: str, path: str, user_agent: str) -> _Span:
        span = _Span(method, path, user_agent, time.monotonic())
        with self._cond:
            self._spans.append(span)
        return span

    def _close_span(self, span: _Span) -> None:
        with self._cond:
            span.end = time.monotonic()

    def _track_socket(self, sock: socket.socket) -> None:
        with self._cond:
            self._sockets.add(sock)

    def _untrack_socket(self, sock: socket.socket) -> None:
        with self._cond:
            self._sockets.discard(sock)

    def _track_thread(self, thread: threading.Thread) -> None:
        with self._cond:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)

    def _new_upstream(self) -> http.client.HTTPConnection:
        if self._ssl_context is not None:
            return http.client.HTTPSConnection(
                self._target_hostname,
                self._target_port,
                timeout=self.upstream_timeout,
                context=self._ssl_context,
            )
        return http.client.HTTPConnection(
            self._target_hostname, self._target_port, timeout=self.upstream_timeout
        )


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # FaultProxy joins its handler threads itself, with a bound

    def __init__(self, proxy: FaultProxy, address: tuple[str, int]) -> None:
        self.proxy = proxy
        super().__init__(address, _ProxyHandler)

    def process_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
    ) -> None:
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=f"fault-proxy-{self.proxy.port}-conn",
            daemon=True,
        )
        self.proxy._track_thread(thread)
        thread.start()


class _UpstreamError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _hung_up(client: socket.socket) -> bool:
    """Whether the client has closed its side (an orderly close reads as b"")."""
    try:
        readable, _, _ = select.select([client], [], [], 0)
        return bool(readable) and not client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True


class _ProxyHandler(BaseHTTPRequestHandler):
    """One client connection (keep-alive: several requests, one after another)."""

    protocol_version = "HTTP/1.1"
    server: _ProxyServer
    _upstream: http.client.HTTPConnection | None

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.proxy.idle_timeout)
        self._upstream = None
        self.server.proxy._track_socket(self.connection)

    def finish(self) -> None:
        try:
            with contextlib.suppress(OSError):
                super().finish()
        finally:
            self._close_upstream()
            self.server.proxy._untrack_socket(self.connection)

    def log_message(self, format: str, *args: object) -> None:
        pass

    def handle(self) -> None:
        # A client or target hanging up mid-request ends this connection, quietly.
        with contextlib.suppress(OSError):
            super().handle()

    def handle_one_request(self) -> None:
        # A TLS ClientHello (a client trying HTTPS first) is not HTTP: hang up at once
        # instead of waiting for a request line that never comes.
        try:
            if isinstance(self.rfile, io.BufferedReader):
                first = self.rfile.peek(1)[:1]  # buffered bytes first, else one socket read
            else:
                first = self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            first = b""
        if first in (b"", b"\x16"):
            self.close_connection = True
            return
        super().handle_one_request()

    def do_GET(self) -> None:
        proxy = self.server.proxy
        span = proxy._open_span(self.command, urlsplit(self.path).path,
                                self.headers.get("User-Agent", ""))
        try:
            self._handle()
        finally:
            proxy._close_span(span)

    do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    # -- dispatch ------------------------------------------------------------------------

    def _handle(self) -> None:
        proxy = self.server.proxy
        method = self.command
        path = urlsplit(self.path).path
        user_agent = self.headers.get("User-Agent", "")
        action, epoch = proxy._decide(method, path)
        if action is not None and action.kind == "hang":
            proxy._record(method, path, NO_RESPONSE, user_agent)
            proxy._wait_switch(epoch, action.seconds, self.connection)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if action is not None and action.kind == "respond":
            self._send_canned(action, path, user_agent)
            return
        if action is not None and action.kind == "delay":
            proxy._wait_switch(epoch, action.seconds, self.connection)
            if _hung_up(self.connection):  # nobody waits for it: not forwarded
                proxy._record(method, path, NO_RESPONSE, user_agent)
                self.close_connection = True
                return
        late = action is not None and action.kind == "late"
        self._forward(method, path, user_agent,
                      (epoch, action.seconds) if late and action else None)

    def _has_body(self) -> bool:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return True
        return int(self.headers.get("Content-Length") or 0) > 0

    def _send_canned(self, action: _Action, path: str, user_agent: str) -> None:
        if self._has_body():
            self.close_connection = True  # the unread body would corrupt the next request
        self.server.proxy._record(self.command, path, action.status, user_agent)
        self.send_response_only(action.status)
        for name, value in action.headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and action.body:
            self.wfile.write(action.body)

    # -- forwarding ----------------------------------------------------------------------

    def _request_body(self) -> tuple[Iterator[bytes] | None, bool]:
        """(body chunks or None, whether the client sent it chunked)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked(), True
        length = int(self.headers.get("Content-Length") or 0)
        return (self._read_exact(length), False) if length > 0 else (None, False)

    def _read_exact(self, length: int) -> Iterator[bytes]:
        left = length
        while left > 0:
            chunk = self.rfile.read(min(left, _CHUNK))
            if not chunk:
                raise ConnectionError("client closed the connection mid-body")
            left -= len(chunk)
            yield chunk

    def _read_chunked(self) -> Iterator[bytes]:
        while True:
            size_line = self.rfile.readline(1024)
            if not size_line:
                raise ConnectionError("client closed the connection mid-body")
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                # Trailers (ignored) end with an empty line; each line consumes input.
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
                return
            yield from self._read_exact(size)
            self.rfile.readline(3)  # the CRLF after the chunk

    def _forward_headers(self, chunked_body: bool) -> list[tuple[str, str]]:
        listed = {
            token.strip().lower()
            for token in self.headers.get("Connection", "").split(",")
            if token.strip()
        }
        out = []
        for name, value in self.headers.items():
            lower = name.lower()
            if lower in _HOP_BY_HOP or lower in listed or lower == "host":
                continue
            if chunked_body and lower == "content-length":
                continue
            out.append((name, value))
        return out

    def _close_upstream(self) -> None:
        conn, self._upstream = self._upstream, None
        if conn is not None:
            conn.close()

    def _send_upstream(
        self, method: str, headers: list[tuple[str, str]], body: Iterator[bytes] | None,
        chunked: bool,
    ) -> tuple[http.client.HTTPResponse, socket.socket]:  # fmt: skip
        proxy = self.server.proxy
        # A kept-alive upstream connection may have been closed by the target meanwhile;
        # a request without a body is retried once on a fresh connection.
        attempts = 2 if body is None and self._upstream is not None else 1
        for attempt in range(attempts):
            if self._upstream is None:
                self._upstream = proxy._new_upstream()
            conn = self._upstream
            sock: socket.socket | None = None
            try:
                if conn.sock is None:
                    conn.connect()
                sock = conn.sock
                assert sock is not None
                proxy._track_socket(sock)
                conn.putrequest(method, self.path, skip_host=True, skip_accept_encoding=True)
                conn.putheader("Host", proxy.target_host)
                for name, value in headers:
                    conn.putheader(name, value)
                if chunked:
                    conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders()
                if body is not None:
                    for chunk in body:
                        if chunked:
                            conn.send(b"%X\r\n%s\r\n" % (len(chunk), chunk))
                        else:
                            conn.send(chunk)
                    if chunked:
                        conn.send(b"0\r\n\r\n")
                return conn.getresponse(), sock
            except (OSError, http.client.HTTPException) as e:
                if sock is not None:
                    proxy._untrack_socket(sock)
                self._close_upstream()
                if isinstance(e, TimeoutError):
                    raise _UpstreamError(504, f"target timed out: {e!r}") from e
                if attempt + 1 >= attempts:
                    raise _UpstreamError(502, f"target unreachable: {e!r}") from e
        raise AssertionError("unreachable")

    def _forward(self, method: str, path: str, user_agent: str,
                 hold: tuple[int, float] | None = None) -> None:
        proxy = self.server.proxy
        body, chunked = self._request_body()
        headers = self._forward_headers(chunked)
        try:
            resp, upstream_sock = self._send_upstream(method, headers, body, chunked)
        except _UpstreamError as e:
            self.close_connection = True
            data = oci_error("UNAVAILABLE", str(e))
            self._send_canned(
                _Action(
                    "respond",
                    _Match(None, None),
                    None,
                    status=e.status,
                    headers=(
                        ("Content-Type", "application/json"),
                        ("Content-Length", str(len(data))),
                    ),
                    body=data,
                ),
                path,
                user_agent,
            )
            return
        try:
            if hold is not None:
                proxy._wait_switch(*hold, self.connection)
            self._relay(method, path, user_agent, resp)
        finally:
            proxy._untrack_socket(upstream_sock)

    def _relay(
        self, method: str, path: str, user_agent: str, resp: http.client.HTTPResponse
    ) -> None:
        proxy = self.server.proxy
        listed = {
            t.strip().lower() for t in (resp.getheader("Connection") or "").split(",") if t.strip()
        }
        headers = [
            (n, v)
            for n, v in resp.getheaders()
            if n.lower() not in _HOP_BY_HOP and n.lower() not in listed
        ]
        headers = proxy._rewrite_headers(method, path, headers)
        has_body = method != "HEAD" and resp.status >= 200 and resp.status not in (204, 304)
        # A chunked or close-delimited upstream body goes out chunked.
        rechunk = has_body and (resp.chunked or resp.length is None)
        if rechunk:
            headers = [(n, v) for n, v in headers if n.lower() != "content-length"]
        proxy._record(method, path, resp.status, user_agent)
        try:
            self.send_response_only(resp.status, resp.reason)
            for name, value in headers:
                self.send_header(name, value)
            if rechunk:
                self.send_header("Transfer-Encoding", "chunked")
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if has_body:
                while True:
                    chunk = resp.read(_CHUNK)
                    if not chunk:
                        break
                    if rechunk:
                        self.wfile.write(b"%X\r\n%s\r\n" % (len(chunk), chunk))
                    else:
                        self.wfile.write(chunk)
                if rechunk:
                    self.wfile.write(b"0\r\n\r\n")
            else:
                resp.read()
        except (OSError, http.client.HTTPException):
            # Client gone or target cut the body short: neither connection is reusable.
            self.close_connection = True
            self._close_upstream()
            return
        if resp.will_close:
            self._close_upstream()
