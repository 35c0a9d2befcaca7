"""Talking to registries over HTTP: where to send a request (hosts), authenticated
requests (session), asking for a tag's current digest (probe), and copying images
between registries (copy)."""

from nodekeeper.registry.copy import Copier, CopyReport, Location
from nodekeeper.registry.hosts import Endpoint, Hosts
from nodekeeper.registry.probe import Prober, ProbeResult
from nodekeeper.registry.session import Session

__all__ = ["Copier", "CopyReport", "Endpoint", "Hosts", "Location", "ProbeResult", "Prober",
           "Session"]
