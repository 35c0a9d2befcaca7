"""Talking to registries over HTTP: where to send a request (hosts), and asking for a
tag's current digest (probe), with the token and basic auth flows."""

from nodekeeper.registry.hosts import Endpoint, endpoints
from nodekeeper.registry.probe import ProbeFailure, Prober, ProbeResult

__all__ = ["Endpoint", "ProbeFailure", "ProbeResult", "Prober", "endpoints"]
