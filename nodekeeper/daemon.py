"""nodekeeper serve: wiring and lifecycle, in the order things start.

    kubelet ──CRI──> [listener socket] ── cri.ImageService ──────> containerd
                                              │ PullImage                ▲
                                              ▼                          │ pull, alias; image events
                                       puller.Puller ⇄ decision.next_step (pure: what next)
                                              │   policy (policyfile), state (SQLite),
                                              │   presence (what the node holds)
                           registry.Prober ───┴─── backing.Backing (registry.Copier)
                       (upstream digest probe)     (cluster-wide copy of every pull)

                       events.Events ──> kube-apiserver: an Event on the pod for every
                       answer upstream did not confirm (queued; never holds up a pull)

The puller reaches its edges through the Protocols in pull/edges.py; failures outside
nodekeeper are one vocabulary (failures.Kind), and cri.py alone turns errors into gRPC
status codes.

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
import time
from dataclasses import dataclass, field

import grpc
import grpc.aio

from nodekeeper import config as configuration
from nodekeeper import logs, metrics
from nodekeeper.containerd.client import CHANNEL_OPTIONS, Containerd
from nodekeeper.cri import ImageService
from nodekeeper.errors import SettingsError
from nodekeeper.host import listener, runstatus
from nodekeeper.host.looplag import LagMonitor
from nodekeeper.host.systemd import Notifier
from nodekeeper.kube.events import Events
from nodekeeper.offloop import Loader
from nodekeeper.policyfile import PolicyFile
from nodekeeper.pull.puller import Puller
from nodekeeper.registry import Hosts, Prober, Session
from nodekeeper.registry.backing import Backing
from nodekeeper.registry.copy import Copier
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
        self._published: dict[str, object] = {}

    async def run(self) -> int:
        config = self.config
        loop = asyncio.get_running_loop()

        # The policy, before anything starts: an invalid one refuses the start.
        self._policy = await PolicyFile.open(config.policy_file, self._loader)

        # containerd: one channel for every call, reconnecting by itself.
        containerd = Containerd(config.containerd.address, config.containerd.namespace)

        # What PullImage decides with: state, the registry prober, the policy in force.
        # State never fails the start: whatever its directory's condition, it is kept in
        # memory, and its health reported (called from state's writer thread).
        def on_state(health: Health) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody to tell
                loop.call_soon_threadsafe(self._on_state, health)

        state = State(config.state_dir, on_health=on_state)
        session = Session()
        prober = Prober(Hosts(config.containerd.hosts_dir), session)
        # The cluster-wide backing registry, when configured.
        backing = (Backing(config.backing, session, Copier(session),
                           on_health=lambda health: state.set_meta("backing", health),
                           node=containerd)
                   if config.backing.enabled else None)
        # Events on the pod for answers upstream did not confirm, when the kubeconfig
        # allows; started with the background tasks.
        events = Events.from_config(config.kubernetes)
        puller = Puller(containerd, prober, state, self._policy.get, backing, events)

        # The CRI image service the kubelet talks to, on our unix socket.
        service = ImageService(containerd, puller)
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        server.add_generic_rpc_handlers((service.handler(),))
        listener.prepare(config.listen)
        server.add_insecure_port(f"unix://{config.listen}")
        await server.start()
        identity = listener.secure(config.listen)

        # Metrics, when an address is configured.
        if config.metrics_address:
            metrics.serve(config.metrics_address)

        # Signals.
        signals = _Signals()
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(number, signals.on_stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

        # Background tasks: the systemd watchdog, the loop's own lag and the view of it
        # `status` reads, containerd's reachability and image events, and the policy file
        # (a local stat; nothing here polls a registry).
        background = [
            asyncio.create_task(self._notifier.watchdog(), name="watchdog"),
            asyncio.create_task(self._lag.run(), name="loop-lag"),
            asyncio.create_task(self._publish_every(STATUS_FILE_SECONDS), name="status-file"),
            asyncio.create_task(containerd.watch(self._on_containerd), name="containerd-watch"),
            asyncio.create_task(containerd.follow_images(), name="containerd-images"),
            asyncio.create_task(self._policy.watch(), name="policy-watch"),
        ]
        await events.start()
        self._notifier.ready(self._status())
        _log.info("serving", listen=config.listen, containerd=config.containerd.address,
                  config=config.source or "(defaults)", metrics=config.metrics_address or "off")

        await signals.stop.wait()
        await self._shutdown(server, service, signals)
        if self._reloading is not None:
            background.append(self._reloading)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await events.close()
        if backing is not None:
            await backing.close()
        await containerd.close()
        await session.close()
        state.close()
        self._status_path.unlink(missing_ok=True)
        listener.remove(config.listen, identity)
        _log.info("stopped")
        return 0

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

    def _publish(self) -> None:
        """Write the view `nodekeeper status` reads, when it changed."""
        lag = self._lag.view()
        health = self._state_health
        view: dict[str, object] = {
            "pid": os.getpid(),
            "state": None if health is None else dataclasses.asdict(health),
            "loop_lag": dataclasses.asdict(lag),
        }
        if view == self._published:
            return
        try:
            runstatus.write(self._status_path, {**view, "written_at": time.time()})
        except OSError as exc:
            _log.debug("cannot write the status file", path=str(self._status_path),
                       error=str(exc))
            return
        self._published = view

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


def serve(config: configuration.Config, overrides: configuration.Overrides) -> int:
    logs.setup(config.log.level, config.log.format)
    if config.metrics_address:
        metrics.enable()
    return asyncio.run(Daemon(config, overrides).run())
