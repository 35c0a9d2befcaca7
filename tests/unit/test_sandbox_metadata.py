"""PodSandboxConfig: the pod's metadata is read, every other field survives untouched."""

from __future__ import annotations

from nodekeeper._proto import cri_image_pb2 as cri
from nodekeeper.pull.edges import Pod


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


UID = "1f0c6b2e-7d1a-4c59-9a43-0e6d2b8c5a11"
# What the kubelet sends, in field order as Go marshals it: metadata, hostname,
# log_directory, labels (a map entry), linux (a nested message).
METADATA = (_field(1, b"web-0") + _field(2, UID.encode()) + _field(3, b"shop")
            + _field(4, 2))
SANDBOX = (_field(1, METADATA) + _field(2, b"web-0") + _field(3, b"/var/log/pods/x")
           + _field(6, _field(1, b"app") + _field(2, b"web"))
           + _field(8, _field(2, _field(1, b"/kubepods"))))
REQUEST = _field(1, _field(1, b"postgres:15")) + _field(3, SANDBOX)


def test_metadata_is_read_from_a_kubelet_request() -> None:
    parsed = cri.PullImageRequest.FromString(REQUEST)
    meta = parsed.sandbox_config.metadata
    assert (meta.name, meta.namespace, meta.uid, meta.attempt) == ("web-0", "shop", UID, 2)
    assert Pod.of(meta.name, meta.namespace, meta.uid) == Pod("web-0", "shop", UID)


def test_every_other_sandbox_field_survives_byte_for_byte() -> None:
    parsed = cri.PullImageRequest.FromString(REQUEST)
    assert parsed.SerializeToString() == REQUEST


def test_a_request_without_sandbox_names_no_pod() -> None:
    parsed = cri.PullImageRequest.FromString(_field(1, _field(1, b"postgres:15")))
    assert not parsed.HasField("sandbox_config")
    meta = parsed.sandbox_config.metadata
    assert Pod.of(meta.name, meta.namespace, meta.uid) is None
