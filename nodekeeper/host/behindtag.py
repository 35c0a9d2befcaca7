"""Running containers behind their tag, as the daemon counts them and `status` lists
them: what the runtime says runs (containerd's CRI runtime service), compared with what
nodekeeper's own checks learned of each tag (the state database). Nothing is asked of a
registry; a tag nobody pulled through this node since it moved is not known to have moved.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor, ThreadPoolExecutor

from nodekeeper import logs, metrics
from nodekeeper.behind import Behind, find
from nodekeeper.containerd import containers
from nodekeeper.containerd.client import Containerd
from nodekeeper.errors import NodekeeperError
from nodekeeper.kube import events as kube_events
from nodekeeper.kube.events import Events
from nodekeeper.pull.edges import Pod
from nodekeeper.state import view

# The count changes when a pod starts or a tag's check learns a new digest. Each survey
# costs one read of the state database, one ListContainers and one ImageStatus per
# distinct image on the node, all local; the kubelet itself lists containers every second.
SURVEY_SECONDS = 15.0

_log = logs.get("behind")


async def survey(containerd: Containerd, state_dir: str,
                 reader: Executor | None = None) -> list[Behind]:
    """NodekeeperError when containerd or the state database cannot be read. The database
    is read on `reader` (the loop's default executor when None), never on the loop."""
    known = await asyncio.get_running_loop().run_in_executor(reader, view.known, state_dir)
    if known is None or not known.latest:
        return []
    return find(await containers.running(containerd), known)


async def watch(containerd: Containerd, state_dir: str, events: Events,
                every: float = SURVEY_SECONDS) -> None:
    """Keep nodekeeper_containers_behind_tag current; log each container once per digest
    its tag moved to, and tell its pod with an Event when `behind` is among the Event
    decisions. What was told is kept in memory: after a restart of the daemon, a pod
    still behind is told once more."""
    # A thread of its own, joined when the daemon stops (a read waits at most the state
    # view's busy timeout), rather than the loop's default executor, which outlives it.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="behind-tag") as reader:
        await _watch(containerd, state_dir, events, every, reader)


async def _watch(containerd: Containerd, state_dir: str, events: Events, every: float,
                 reader: Executor) -> None:
    told: set[tuple[str, str]] = set()
    while True:
        try:
            found = await survey(containerd, state_dir, reader)
        except NodekeeperError as exc:
            _log.debug("containers behind their tag not surveyed", error=str(exc))
        else:
            metrics.CONTAINERS_BEHIND.set(len(found))
            now = set()
            for behind in found:
                key = (behind.running.container_id, behind.latest.digest)
                now.add(key)
                if key not in told:
                    _log.info("container behind its tag", pod=behind.running.pod,
                              namespace=behind.running.namespace,
                              container=behind.running.container,
                              reference=behind.reference, runs=behind.runs,
                              tag_digest=behind.latest.digest)
                    tell(events, behind)
            told = now
        await asyncio.sleep(every)


def tell(events: Events, behind: Behind) -> None:
    """An Event on the pod of a container behind its tag (when Events are told of it)."""
    running = behind.running
    pod = Pod.of(running.pod, running.namespace, running.pod_uid)
    if pod is None:
        return
    events.observe_behind(kube_events.Behind(
        pod=pod, reference=behind.reference, runs=behind.runs, digest=behind.latest.digest,
        since=behind.latest.since))
