"""Docker/distribution token authentication ("Bearer" challenges) on loopback.

``TokenServer`` issues JWTs the way a real registry token service does, for a ``Registry``
started with ``token_auth=``. Tokens are RS256, signed with the ``openssl`` CLI by a key whose
self-signed certificate is the registry's ``rootcertbundle``; the certificate also travels in
the JWT header as ``x5c`` (distribution 2.8 verifies that chain against the bundle). With
``signing_header="kid"`` the header names the key instead, by the libtrust key ID that
distribution computes for every key in the bundle.

``BearerAuth`` is the client half (an ``httpx.Auth``): it answers a registry's Bearer
challenge by fetching a token from the realm, as containerd and docker do.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal, cast
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx

from tests.harness._proc import Service
from tests.harness.oci import Auth, Image, Index, Verify, build_image, push
from tests.harness.registry import free_port

SigningHeader = Literal["x5c", "kid"]

_KNOWN_ACTIONS = ("pull", "push", "delete", "*")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _run(argv: list[str], stdin: bytes | None = None) -> bytes:
    done = subprocess.run(argv, input=stdin, capture_output=True, check=False, timeout=30)
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace")
        raise RuntimeError(f"{' '.join(argv)} failed:\n{err}")
    return done.stdout


def _pem_to_der(pem: str) -> bytes:
    body = "".join(line for line in pem.splitlines() if line and not line.startswith("-----"))
    return binascii.a2b_base64(body)


def libtrust_key_id(spki_der: bytes) -> str:
    """The key ID libtrust (and so distribution 2.8) gives a public key: SHA-256 of its DER
    SubjectPublicKeyInfo, first 240 bits, base32 without padding, in colon-separated groups
    of four characters."""
    encoded = base64.b32encode(hashlib.sha256(spki_der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


@dataclass(frozen=True)
class Scope:
    """One parsed ``type:name:actions`` scope."""

    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope | None:
        kind, sep, rest = text.partition(":")
        name, sep2, actions = rest.rpartition(":")
        if not (sep and sep2 and kind and name):
            return None
        return cls(kind, name, tuple(a for a in actions.split(",") if a))

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server answered."""

    method: str  # GET (docker token protocol) or POST (OAuth2 password grant)
    user: str | None  # None: anonymous (or refused credentials, see status)
    service: str | None
    scopes: tuple[str, ...]  # as requested
    granted: tuple[str, ...]  # the token's access, as scope strings (empty: nothing)
    status: int

    @property
    def anonymous(self) -> bool:
        return self.user is None


class TokenServer(Service):
    """A registry token service on 127.0.0.1 (``GET /token``, and ``POST /token`` OAuth2).

    Users (``users``: name -> password, sent as HTTP Basic on GET or as the password grant on
    POST) get every action they ask for on every repository. Anonymous callers get ``pull``
    on the repositories named in ``anonymous_pull`` and an empty access list elsewhere (the
    registry then answers 401 ``insufficient_scope``). Wrong credentials get 401.

    The key and certificate are made in ``__init__`` (so a ``Registry`` can be configured
    before ``start()``); ``realm`` may be reassigned before the registry starts, for
    example to route token requests through a ``FaultProxy``. ``expires_in`` may be changed
    at any time. Note that distribution accepts a token for 60 s past its ``exp``.
    """

    def __init__(
        self,
        users: dict[str, str],
        *,
        anonymous_pull: set[str] | None = None,
        expires_in: int = 300,
        service: str = "nodekeeper-test-registry",
        issuer: str = "nodekeeper-test-token-issuer",
        signing_header: SigningHeader = "x5c",
        oauth_post: bool = True,
        base_dir: Path | None = None,
        port: int | None = None,
    ) -> None:
        self.users = dict(users)
        self.anonymous_pull = set(anonymous_pull or ())
        self.expires_in = expires_in
        self.service = service
        self.issuer = issuer
        self.signing_header: SigningHeader = signing_header
        self.oauth_post = oauth_post
        self._own_dir = base_dir is None
        self.base_dir = (
            Path(tempfile.mkdtemp(prefix="nk-token-")) if base_dir is None else Path(base_dir)
        )
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.realm = f"{self.url}/token"
        self.key_path = self.base_dir / "token-signer.key"
        self.cert_path = self.base_dir / "token-signer.pem"
        self._make_key()
        cert_der = _run(["openssl", "x509", "-in", str(self.cert_path), "-outform", "DER"])
        spki_der = _run(
            ["openssl", "pkey", "-in", str(self.key_path), "-pubout", "-outform", "DER"]
        )
        self.x5c = base64.b64encode(cert_der).decode()
        self.key_id = libtrust_key_id(spki_der)
        self._lock = threading.Lock()
        self._log: list[TokenRequest] = []
        self._server: _TokenHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def _make_key(self) -> None:
        _run([
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
            "-keyout", str(self.key_path), "-out", str(self.cert_path), "-days", "2",
            "-subj", "/CN=nodekeeper test token signer",
        ])  # fmt: skip

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        if self._server is not None:
            return
        server = _TokenHTTPServer(self, ("127.0.0.1", self.port))
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1},
            name=f"token-server-{self.port}", daemon=True,
        )  # fmt: skip
        self._server, self._thread = server, thread
        thread.start()

    def stop(self) -> None:
        """Stop serving (connections are then refused); ``start()`` serves again."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()  # joins the (short-lived, HTTP/1.0) handler threads
        if thread is not None:
            thread.join(timeout=5.0)

    def close(self) -> None:
        """Stop, and remove the key directory if this server made it. Safe to call twice."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)


    # -- tokens --------------------------------------------------------------------------

    def grant(self, user: str | None, scopes: Iterable[str]) -> list[Scope]:
        """The access a token for ``user`` (None: anonymous) asking for ``scopes`` carries."""
        granted: list[Scope] = []
        for text in scopes:
            scope = Scope.parse(text)
            if scope is None:
                continue
            if user is not None:
                actions = tuple(a for a in scope.actions if a in _KNOWN_ACTIONS)
            elif scope.type == "repository" and scope.name in self.anonymous_pull:
                actions = ("pull",) if "pull" in scope.actions else ()
            else:
                actions = ()
            if actions:
                granted.append(Scope(scope.type, scope.name, actions))
        return granted

    def make_token(
        self,
        subject: str,
        access: Iterable[Scope],
        *,
        expires_in: int | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        signing_header: SigningHeader | None = None,
        now: float | None = None,
    ) -> str:
        """A signed JWT; the keyword arguments allow deliberately bad tokens in tests."""
        issued = int(time.time() if now is None else now)
        lifetime = self.expires_in if expires_in is None else expires_in
        mode = self.signing_header if signing_header is None else signing_header
        header: dict[str, object] = {"typ": "JWT", "alg": "RS256"}
        if mode == "x5c":
            header["x5c"] = [self.x5c]
        else:
            header["kid"] = self.key_id
        claims = {
            "iss": self.issuer if issuer is None else issuer,
            "sub": subject,
            "aud": self.service if audience is None else audience,
            "exp": issued + lifetime,
            "nbf": issued - 1,
            "iat": issued,
            "jti": secrets.token_hex(12),
            "access": [
                {"type": s.type, "name": s.name, "actions": list(s.actions)} for s in access
            ],
        }
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        signature = _run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key_path)],
            stdin=signing_input.encode(),
        )
        return f"{signing_input}.{_b64url(signature)}"

    # -- observation ---------------------------------------------------------------------

    def _record(self, entry: TokenRequest) -> None:
        with self._lock:
            self._log.append(entry)

    def requests(
        self,
        *,
        user: str | None = None,
        anonymous: bool | None = None,
        scope_contains: str | None = None,
        status: int | None = None,
    ) -> list[TokenRequest]:
        """Token requests answered so far (since ``clear()``), oldest first."""
        with self._lock:
            log = list(self._log)
        return [
            r
            for r in log
            if (user is None or r.user == user)
            and (anonymous is None or r.anonymous == anonymous)
            and (scope_contains is None or any(scope_contains in s for s in r.scopes))
            and (status is None or r.status == status)
        ]

    def clear(self) -> None:
        with self._lock:
            self._log.clear()


class _TokenHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner: TokenServer, address: tuple[str, int]) -> None:
        self.owner = owner
        super().__init__(address, _TokenHandler)


class _TokenHandler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so no idle keep-alive thread outlives stop().
    server: _TokenHTTPServer
    timeout = 10.0

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _reply(self, status: int, body: dict[str, object], headers: dict[str, str]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _refuse(self, status: int, code: str, message: str) -> None:
        headers = {}
        if status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="nodekeeper-test-token"'

        self._reply(status, {"errors": [{"code": code, "message": message}]}, headers)

    def _basic_user(self) -> tuple[bool, str | None]:
        """(credentials acceptable, user). No Authorization header: anonymous."""
        header = self.headers.get("Authorization")
        if header is None:
            return True, None
        kind, _, value = header.partition(" ")
        if kind.lower() != "basic":
            return False, None
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False, None
        return self.server.owner.users.get(user) == password, user

    def do_GET(self) -> None:
        owner = self.server.owner
        url = urlsplit(self.path)
        if url.path != "/token":
            owner._record(TokenRequest("GET", None, None, (), (), 404))
            self._refuse(404, "NOT_FOUND", "no such endpoint")
            return
        query = parse_qs(url.query)
        scopes = tuple(s for raw in query.get("scope", []) for s in raw.split(" ") if s)
        service = query.get("service", [None])[0]
        ok, user = self._basic_user()
        if not ok:
            owner._record(TokenRequest("GET", user, service, scopes, (), 401))
            self._refuse(401, "UNAUTHORIZED", "invalid credentials")
            return
        self._issue("GET", user, service, scopes)

    def do_POST(self) -> None:
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(min(length, 1 << 20)).decode(errors="replace"))
        scopes = tuple(s for raw in form.get("scope", []) for s in raw.split(" ") if s)
        service = form.get("service", [None])[0]
        if urlsplit(self.path).path != "/token" or not owner.oauth_post:
            owner._record(TokenRequest("POST", None, service, scopes, (), 404))
            self._refuse(404, "NOT_FOUND", "no such endpoint")
            return
        grant_type = form.get("grant_type", [""])[0]
        if grant_type != "password":
            owner._record(TokenRequest("POST", None, service, scopes, (), 400))
            self._refuse(400, "unsupported_grant_type", f"grant_type {grant_type!r}")
            return
        user = form.get("username", [""])[0]
        if owner.users.get(user) != form.get("password", [None])[0]:
            owner._record(TokenRequest("POST", user, service, scopes, (), 401))
            self._refuse(401, "UNAUTHORIZED", "invalid credentials")
            return
        self._issue("POST", user, service, scopes)

    def _issue(
        self, method: str, user: str | None, service: str | None, scopes: tuple[str, ...]
    ) -> None:
        owner = self.server.owner
        granted = owner.grant(user, scopes)
        now = time.time()
        token = owner.make_token(user or "", granted, now=now)
        issued_at = datetime.fromtimestamp(int(now), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body: dict[str, object] = {
            "access_token": token,
            "expires_in": owner.expires_in,
            "issued_at": issued_at,
        }
        if method == "GET":
            body["token"] = token
        else:
            body["scope"] = " ".join(str(s) for s in granted)
        owner._record(
            TokenRequest(method, user, service, scopes, tuple(str(s) for s in granted), 200)
        )
        self._reply(200, body, {})


# -- client side ---------------------------------------------------------------------------

_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def parse_bearer_challenge(header: str) -> dict[str, str] | None:
    """The parameters of a ``Bearer ...`` WWW-Authenticate value (None if not Bearer)."""
    kind, _, params = header.strip().partition(" ")
    if kind.lower() != "bearer":
        return None
    return dict(_CHALLENGE_PARAM.findall(params))


class BearerAuth(httpx.Auth):
    """Answers a registry's Bearer challenge with a token from its realm (GET, with Basic
    credentials when given), then retries; reuses the last token until challenged again."""

    requires_request_body = True
    requires_response_body = True

    def __init__(self, username: str | None = None, password: str | None = None) -> None:
        self.credentials = (username, password or "") if username is not None else None
        self.token: str | None = None

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self.token is not None:
            request.headers["Authorization"] = f"Bearer {self.token}"
        response = yield request
        if response.status_code != 401:
            return
        challenge = parse_bearer_challenge(response.headers.get("WWW-Authenticate", ""))
        if challenge is None or "realm" not in challenge:
            return
        params: dict[str, str] = {k: challenge[k] for k in ("service", "scope") if k in challenge}
        token_request = httpx.Request("GET", f"{challenge['realm']}?{urlencode(params)}")
        if self.credentials is not None:
            user, password = self.credentials
            basic = base64.b64encode(f"{user}:{password}".encode()).decode()
            token_request.headers["Authorization"] = f"Basic {basic}"
        token_response = yield token_request
        if token_response.status_code != 200:
            return
        answer = token_response.json()
        self.token = str(answer.get("token") or answer.get("access_token"))
        request.headers["Authorization"] = f"Bearer {self.token}"
        yield request


def push_with_token(
    registry_url: str,
    repo: str,
    tag: str | None,
    image: Image | Index,
    auth: BearerAuth,
    *,
    verify: Verify = True,
) -> str:
    """``oci.push`` to a token-auth registry (httpx takes any ``httpx.Auth`` where ``oci``
    types a Basic tuple)."""
    return push(registry_url, repo, tag, image, cast(Auth, auth), verify=verify)


def push_new_with_token(
    registry_url: str,
    repo: str,
    tag: str,
    auth: BearerAuth,
    *,
    seed: str,
    verify: Verify = True,
    platform: tuple[str, str] = ("linux", "amd64"),
) -> Image:
    """Build a fresh image from ``seed`` and push it as ``repo:tag`` with a token."""
    image = build_image(seed=seed, platform=platform)
    push_with_token(registry_url, repo, tag, image, auth, verify=verify)
    return image
