"""nodekeeper serve: wiring and lifecycle, in the order things start.

    kubelet ──CRI──> [listener socket] ── cri.ImageService ──────> containerd
                                              │ PullImage                ▲
                                              ▼                          │ pull, alias, content;
                                       pull.Puller ⇄ decision.next_step  │ image events
                                              │   (pure: what next)
                                              │   policy (policyfile), state (SQLite),
                                              │   presence (what the node holds)
          registry.Prober ────────────────────┼──────────── registry.Backing
          (upstream digest probe; outage      │             (cluster-wide copy of every
          episodes per endpoint: one probe    │             pull, read from the node's own
          in flight, pulls wait outage_wait)  │             content store)
                                              └──────────── registry.Cluster
                                                            (through backing: one fetch
                                                            per digest, shared checks)

          kube.Events ──> kube-apiserver: an Event on the pod for every answer upstream
          did not confirm, and for containers behind their tag (queued; never holds up a
          pull); host.behindtag counts those containers from the runtime and state.

The puller reaches its edges through the Protocols in pull/edges.py; failures outside
nodekeeper are one vocabulary (failures.Kind), and cri.py alone turns errors into gRPC
status codes.

Start and stop are pairs: each part's stop is registered on one AsyncExitStack where the
part is built or started, so stopping (or a failure part-way through starting) stops
what started, newest first: background tasks, the status file, metrics, the gRPC server,
the socket, Events, the cluster and backing, containerd, the prober, the HTTP session,
state, the signal handlers.

Signals: SIGTERM/SIGINT stop gracefully (stop accepting, let in-flight RPCs finish within
shutdown_grace, cancel the rest); a second one stops at once. SIGHUP reloads what can
change without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import grpc.aio

from nodekeeper import config as configuration
from nodekeeper import logs, metrics
from nodekeeper.containerd.client import CHANNEL_OPTIONS, Containerd
from nodekeeper.cri import ImageService
from nodekeeper.errors import SettingsError, StartupError
from nodekeeper.host import behindtag, listener, runstatus
from nodekeeper.host.looplag import LagMonitor
from nodekeeper.host.systemd import Notifier
from nodekeeper.kube.events import Events
from nodekeeper.offloop import Loader
from nodekeeper.policyfile import PolicyFile
from nodekeeper.pull.puller import Puller
from nodekeeper.registry import Hosts, Prober, Session
from nodekeeper.registry.backing import Backing
from nodekeeper.registry.cluster import Cluster
from nodekeeper.registry.copy import Copier
from nodekeeper.registry.outage import Outage
from nodekeeper.state.memory import Health, State

_log = logs.get("daemon")

# Settings bound at start (sockets, directories, ports); a reload leaves them as they are.
_RESTART_ONLY = ("listen", "containerd", "metrics_address", "state_dir", "policy_file",
                 "backing", "kubernetes")
# How often the view `nodekeeper status` reads (host/runstatus.py) is refreshed, when it changed.
STATUS_FILE_SECONDS = 5.0


@dataclass
class _Signals:
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    now: asyncio.Event = field(default_factory=asyncio.Event)

    def on_stop(self) -> None:
        if self.stop.is_set():
            self.now.set()
        self.stop.set()


class Daemon:
    def __init__(self, config: configuration.Config, overrides: configuration.Overrides) -> None:
        self.config = config
        self._overrides = overrides
        self._notifier = Notifier()
        self._containerd_up = False
        # Settings files are read on a worker thread, never on the loop (offloop.py).
        self._loader = Loader()
        self._policy: PolicyFile
        self._reload_wanted = False
        self._reloading: asyncio.Task[None] | None = None
        self._state_health: Health | None = None
        self._lag = LagMonitor()
        self._status_path = runstatus.path_for(config.listen)
        self._status_open = False
        self._published: runstatus.RunStatus | None = None
        self._outages: Callable[[], Sequence[Outage]] = tuple

    async def run(self) -> int:
        """Serve until a signal says stop. Each part's stop is registered where it starts,
        so a failure part-way stops what already started, newest first."""
        async with contextlib.AsyncExitStack() as parts:
            await self._serve(parts)
        _log.info("stopped")
        return 0

    async def _serve(self, parts: contextlib.AsyncExitStack) -> None:
        config = self.config
        loop = asyncio.get_running_loop()

        # The policy, before anything starts: an invalid one refuses the start. It is read
        # on the settings loader's thread, which reloads use too.
        parts.callback(self._loader.close)
        self._policy = await PolicyFile.open(path=config.policy_file, loader=self._loader)

        # Signals, from here on: a stop asked for while starting takes effect once
        # serving; their handlers go last, so a second signal is heard until the end.
        signals = _Signals()
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(number, signals.on_stop)
            parts.callback(loop.remove_signal_handler, number)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        parts.callback(loop.remove_signal_handler, signal.SIGHUP)

        # State: never fails the start. Whatever its directory's condition, it is kept in
        # memory, and its health reported (called from state's writer thread).
        def on_state(health: Health) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody to tell
                loop.call_soon_threadsafe(self._on_state, health)

        state = State(directory=config.state_dir, on_health=on_state)
        parts.callback(state.close)

        # Registries: one HTTP session for the probes upstream and the backing registry.
        session = Session()
        parts.push_async_callback(session.close)
        prober = Prober(hosts=Hosts(roots=config.containerd.hosts_dir), session=session,
                        outage_wait=config.outage_wait, on_outage=self._publish)
        parts.push_async_callback(prober.close)
        self._outages = prober.open_outages

        # containerd: one channel for every call, reconnecting by itself.
        containerd = Containerd(address=config.containerd.address,
                                namespace=config.containerd.namespace)
        parts.push_async_callback(containerd.close)

        # The cluster-wide backing registry, when configured.
        backing, cluster = None, None
        if config.backing.enabled:
            backing = Backing(config=config.backing, session=session,
                              copier=Copier(session=session),
                              on_health=lambda health: state.set_meta("backing", health),
                              node=containerd)
            parts.push_async_callback(backing.close)
            if config.backing.cluster:
                cluster = Cluster(backing=backing, session=session,
                                  node=config.kubernetes.node_name or socket.gethostname().lower(),
                                  fetch_wait=config.backing.fetch_wait)
                parts.push_async_callback(cluster.close)

        # Events on the pod for answers upstream did not confirm, when the kubeconfig
        # allows; posting starts with the background tasks.
        events = Events.from_config(config.kubernetes)
        parts.push_async_callback(events.close)

        # PullImage: the puller decides with state, the prober and the policy in force.
        puller = Puller(images=containerd, upstream=prober, state=state,
                        policy=self._policy.get, backing=backing, events=events,
                        cluster=cluster)

        # The CRI image service the kubelet talks to, on our unix socket.
        service = ImageService(containerd=containerd, puller=puller)
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        server.add_generic_rpc_handlers((service.handler(),))
        listener.prepare(config.listen)
        try:
            server.add_insecure_port(f"unix://{config.listen}")
        except RuntimeError as exc:  # grpc says no more than "Failed to bind"
            raise StartupError(f"cannot listen on {config.listen}: {exc}") from None
        identity = listener.secure(config.listen)
        parts.callback(listener.remove, config.listen, identity)
        await server.start()
        # After a graceful stop (below), this one finds nothing left to stop.
        parts.push_async_callback(server.stop, 0)

        # Metrics, when an address is configured.
        if config.metrics_address:
            stop_metrics = metrics.serve(config.metrics_address)
            parts.push_async_callback(asyncio.to_thread, stop_metrics)

        # The view `nodekeeper status` reads, removed when the daemon stops.
        self._status_open = True
        parts.callback(self._close_status)

        # Background tasks: the systemd watchdog, the loop's own lag and the status
        # file, containerd's reachability and image events, the policy file (a local
        # stat; nothing here polls a registry), the containers behind their tag (the
        # runtime and state only), and a reload under way.
        for work, name in ((self._notifier.watchdog(), "watchdog"),
                           (self._lag.run(), "loop-lag"),
                           (self._publish_every(STATUS_FILE_SECONDS), "status-file"),
                           (containerd.watch(self._on_containerd), "containerd-watch"),
                           (containerd.follow_images(), "containerd-images"),
                           (self._policy.watch(), "policy-watch"),
                           (behindtag.watch(containerd, config.state_dir, events), "behind-tag")):
            parts.push_async_callback(_cancel, asyncio.create_task(work, name=name))
        parts.push_async_callback(self._cancel_reload)
        await events.start()

        self._notifier.ready(self._status())
        _log.info("serving", listen=config.listen, containerd=config.containerd.address,
                  config=config.source or "(defaults)", metrics=config.metrics_address or "off")
        await signals.stop.wait()
        await self._shutdown(server, service, signals)

    async def _shutdown(self, server: grpc.aio.Server, service: ImageService,
                        signals: _Signals) -> None:
        grace = self.config.shutdown_grace
        self._notifier.stopping(f"Stopping, {service.inflight} RPCs in flight")
        _log.info("stopping", inflight=service.inflight, grace_s=grace)
        cancelled_before = service.cancelled
        graceful = asyncio.create_task(server.stop(grace))
        second_signal = asyncio.create_task(signals.now.wait())
        await asyncio.wait({graceful, second_signal}, return_when=asyncio.FIRST_COMPLETED)
        if not graceful.done():
            _log.warning("second signal: stopping now", inflight=service.inflight)
            await server.stop(0)
            await graceful
        second_signal.cancel()
        cancelled = service.cancelled - cancelled_before
        if cancelled:
            _log.warning("cancelled RPCs still running at shutdown", cancelled=cancelled)

    def _on_sighup(self) -> None:
        # Signals arriving during a reload make one more reload after it, not one each.
        self._reload_wanted = True
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.create_task(self._reloads(), name="reload")

    async def _reloads(self) -> None:
        while self._reload_wanted:
            self._reload_wanted = False
            await self.reload()

    async def reload(self) -> None:
        """SIGHUP: re-read the config file and apply what can change while running."""
        self._notifier.reloading()
        source, overrides = self.config.source or None, self._overrides
        try:
            fresh = await self._loader.load(source or configuration.DEFAULT_PATH,
                                            lambda: configuration.load(source, overrides))
        except SettingsError as exc:
            _log.error("reload failed; keeping the running settings", error=str(exc))
            fresh = self.config
        fixed = {name: getattr(self.config, name) for name in _RESTART_ONLY}
        changed = sorted(name for name, value in fixed.items() if getattr(fresh, name) != value)
        if changed:
            _log.warning("changed settings take effect only after a restart", settings=changed)
        self.config = dataclasses.replace(fresh, **fixed)
        await self._policy.reload("SIGHUP")
        _log.info("reloaded", log_level=fresh.log.level, policy_valid=not self._policy.error)
        logs.setup(fresh.log.level, fresh.log.format)
        self._notifier.reloaded(self._status())

    def _on_state(self, health: Health) -> None:
        self._state_health = health
        metrics.STATE_PERSISTENT.set(1 if health.persistent else 0)
        self._notifier.status(self._status())
        self._publish()

    async def _cancel_reload(self) -> None:
        if self._reloading is not None:
            await _cancel(self._reloading)

    def _publish(self) -> None:
        """Write the view `nodekeeper status` reads, when it changed."""
        if not self._status_open:
            return
        view = runstatus.RunStatus(pid=os.getpid(), state=self._state_health,
                                   loop_lag=self._lag.view(),
                                   outages=tuple(self._outages()))
        if view == self._published:
            return
        try:
            runstatus.write(self._status_path,
                            dataclasses.replace(view, written_at=time.time()))
        except OSError as exc:
            _log.debug("cannot write the status file", path=str(self._status_path),
                       error=str(exc))
            return
        self._published = view

    def _close_status(self) -> None:
        # State reports its health once more as it closes, after this: not to be written.
        self._status_open = False
        runstatus.remove(self._status_path)

    async def _publish_every(self, seconds: float) -> None:
        while True:
            self._publish()
            await asyncio.sleep(seconds)

    def _on_containerd(self, reachable: bool) -> None:
        self._containerd_up = reachable
        metrics.CONTAINERD_UP.set(1 if reachable else 0)
        self._notifier.status(self._status())

    def _status(self) -> str:
        state = "reachable" if self._containerd_up else "not reachable"
        policy = "policy reload FAILED, previous policy in force" if self._policy.error else (
            f"policy {len(self._policy.current.rules)} rules")
        stored = "" if self._state_health is None else f"; {self._state_health.summary()}"
        return (f"Serving on {self.config.listen}; containerd at "
                f"{self.config.containerd.address} {state}; {policy}{stored}")


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def serve(config: configuration.Config, overrides: configuration.Overrides) -> int:
    logs.setup(config.log.level, config.log.format)
    if config.metrics_address:
        metrics.enable()
    return asyncio.run(Daemon(config, overrides).run())
