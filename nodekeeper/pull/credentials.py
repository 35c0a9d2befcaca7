"""Registry credentials from a PullImage request, and their keyed fingerprints.

The kubelet sends at most one AuthConfig per PullImage. Like containerd, nodekeeper uses
it only for the registry it belongs to: with `server_address` set, its URL host must be
the host being contacted. What nodekeeper remembers about credentials is an HMAC keyed
with a node-local secret, never the credentials themselves.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from urllib.parse import urlsplit

ANONYMOUS = "anonymous"


@dataclass(frozen=True, repr=False)
class Credentials:
    username: str = ""
    password: str = ""
    identity_token: str = ""
    registry_token: str = ""
    server_address: str = ""

    def __repr__(self) -> str:  # never show secrets, whatever prints this
        return f"Credentials(username={self.username!r}, server_address={self.server_address!r})"

    @classmethod
    def from_fields(cls, username: str = "", password: str = "", auth: str = "",
                    server_address: str = "", identity_token: str = "",
                    registry_token: str = "") -> Credentials | None:
        """containerd's order: username/password, else identity_token, else the base64
        `auth` (user:password). registry_token is kept for probing only."""
        if not username and not identity_token and auth:
            try:
                decoded = base64.b64decode(auth, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            username, _, password = decoded.partition(":")
        if not (username or identity_token or registry_token):
            return None
        return cls(username, password, identity_token, registry_token, server_address)

    def applies_to(self, host: str) -> bool:
        if not self.server_address:
            return True
        # A value without a scheme parses with an empty host and never matches, as in
        # containerd.
        return urlsplit(self.server_address).netloc == host

    def secret_material(self) -> str:
        if self.username:
            return f"basic\0{self.username}\0{self.password}"
        if self.identity_token:
            return f"identity\0{self.identity_token}"
        return f"registry\0{self.registry_token}"


def fingerprint(key: bytes, repository: str, credentials: Credentials | None) -> str:
    """A keyed fingerprint of `credentials` for `repository`; ANONYMOUS for none.

    Bound to the repository, so the same credentials leave unrelated traces elsewhere.
    """
    if credentials is None:
        return ANONYMOUS
    message = f"{repository}\0{credentials.secret_material()}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()
