"""Talking to registries over HTTP: where to send a request (hosts), authenticated
requests (session), asking for a tag's current digest (probe), and copying images
between registries (copy)."""

from nodekeeper.pull.values import Endpoint, Location, ProbeResult
from nodekeeper.registry.copy import Copier, CopyReport
from nodekeeper.registry.hosts import Hosts
from nodekeeper.registry.probe import Prober
from nodekeeper.registry.session import Session

__all__ = ["Copier", "CopyReport", "Endpoint", "Hosts", "Location", "ProbeResult", "Prober",
           "Session"]
