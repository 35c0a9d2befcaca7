"""Talking to registries over HTTP: where to send a request (hosts), authenticated
requests (session), and asking for a tag's current digest (probe)."""

from nodekeeper.registry.hosts import Endpoint, endpoints
from nodekeeper.registry.probe import Prober, ProbeResult
from nodekeeper.registry.session import RegistryError, Session

__all__ = ["Endpoint", "ProbeResult", "Prober", "RegistryError", "Session", "endpoints"]
