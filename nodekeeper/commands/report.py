"""`nodekeeper explain` and `nodekeeper status`: read-only views for operators.

Both read the state database beside a running daemon through state/view.py (read-only;
the daemon keeps it with a rollback journal, never WAL) and ask containerd what the node
holds; neither sends anything to a registry.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from nodekeeper.config import Config
from nodekeeper.containerd.client import Containerd
from nodekeeper.errors import NodekeeperError, SettingsError, StateUnreadable
from nodekeeper.failures import Kind
from nodekeeper.host import runstatus
from nodekeeper.pull import policy as policies
from nodekeeper.pull.decision import (
    Access,
    AskBacking,
    AskCluster,
    AwaitBacking,
    Claim,
    Decision,
    Failed,
    NodeCopy,
    Probe,
    Pull,
    PullFrom,
    Serve,
    Step,
    backing_copy_refusal,
    next_step,
)
from nodekeeper.pull.policy import Settings
from nodekeeper.pull.reference import Reference, parse
from nodekeeper.registry import Session
from nodekeeper.registry.backing import Backing
from nodekeeper.registry.copy import Copier
from nodekeeper.state import view as stateview
from nodekeeper.state.memory import Health
from nodekeeper.timetext import ago


def _local(config: Config, name: str) -> tuple[NodeCopy | None, str]:
    async def ask() -> NodeCopy | None:
        containerd = Containerd(config.containerd.address, config.containerd.namespace)
        try:
            return await containerd.node_copy(name)
        finally:
            await containerd.close()

    try:
        return asyncio.run(asyncio.wait_for(ask(), 5)), ""
    except (NodekeeperError, asyncio.TimeoutError) as exc:
        return None, f"unknown (containerd at {config.containerd.address}: {exc or 'timeout'})"


def explain(config: Config, image: str, policy_path: str | None) -> str:
    ref = parse(image)
    policy = policies.load(policy_path or config.policy_file)
    rule = policy.rule_for(ref)
    s = rule.settings
    lines = [
        f"image:       {image}",
        f"reference:   {ref}  (name {ref.repository})",
        f"rule:        {rule.label} from {policy.source}",
        f"settings:    update={s.update} interval={s.interval:g}s "
        f"probe_timeout={s.probe_timeout:g}s auth_fallback={s.auth_fallback}",
        f"             fallback_on={','.join(sorted(k.value for k in s.fallback_on))}",
    ]
    local, problem = _local(config, str(ref))
    lines.append("on node:     " + (problem or (
        f"{local.image_id} (points at {local.digest or 'unknown digest'})" if local
        else "no copy")))
    last_ok = None
    last_digest = ""
    public = False
    try:
        recorded = stateview.reference(config.state_dir, str(ref), ref.repository)
    except StateUnreadable as exc:
        lines.append(f"last check:  unknown (state database unreadable: {exc})")
    else:
        if recorded is None:
            lines.append("last check:  none recorded (no state database yet)")
        else:
            check, public = recorded.check, recorded.access.anonymous
            if check is None:
                lines.append("last check:  never")
            else:
                last_ok, last_digest = check.ok_at, check.digest
                ok = f"; last success {ago(time.time() - check.ok_at)}" if check.ok_at else ""
                lines.append(f"last check:  {ago(time.time() - check.checked_at)}: "
                             f"{check.result}{ok}"
                             + (f", upstream {check.digest}" if check.digest else ""))
            lines.append("access:      " + ("anonymous pulls seen to work" if public else
                                            "no anonymous pull recorded")
                         + f"; {recorded.access.credentials} credential fingerprint(s) seen "
                           "to work")
    pull = Pull(ref, rule.label, s, local, Access(public=public), time.time(), last_ok,
                last_digest, backing=config.backing.enabled and config.backing.read,
                shared_checks=config.backing.cluster)
    lines.append(f"would:       {_describe(next_step(pull), s, ref)}  [for a pull without "
                 "credentials]")
    if config.backing.enabled:
        lines.append("backing:     " + _backing_view(config, ref, last_digest))
    # The same decision, as it would go if upstream did not answer now.
    down = pull.after(Probe(), Failed(Kind.UNREACHABLE, "no answer"))
    lines.append(f"if upstream fails: {_describe(next_step(down), s, ref)}")
    if not public:
        known = replace(down, access=Access(these=True, anonymous=False))
        lines.append(f"  for credentials seen to work: {_describe(next_step(known), s, ref)}")
    return "\n".join(lines)


def _describe(step: Step, settings: Settings, ref: Reference) -> str:
    if isinstance(step, Serve):
        if step.decision is Decision.FALLBACK:
            return "serve the node's copy"
        return f"answer the node's copy without network ({step.decision}: {step.reason})"
    if isinstance(step, Probe):
        return (f"ask upstream for the digest within {settings.probe_timeout:g}s, pull if it "
                "changed" + (f" ({step.reason})" if step.reason else ""))
    if isinstance(step, PullFrom):
        return "hand the pull to containerd (nothing on the node to compare with)"
    if isinstance(step, AskBacking):
        refusal = backing_copy_refusal(settings, ref, public=False)
        return ("take the backing registry's copy if it holds one"
                + (", only for repositories marked public there" if refusal else ""))
    if isinstance(step, AskCluster):
        return ("answer the node's copy if another node's check, kept in the backing "
                "registry, is younger than the interval and names it; else ask upstream")
    if isinstance(step, Claim | AwaitBacking):
        return "fetch the image once for the cluster, through the backing registry"
    return f"refuse: {step.message.split('; ', 1)[-1]}"


def _backing_view(config: Config, ref: Reference, digest: str) -> str:
    """What the backing registry holds for `ref` (one or two HEADs to backing)."""

    async def ask() -> str:
        session = Session()
        backing = Backing(config.backing, session, Copier(session))
        try:
            tagged = await backing.resolve_tag(ref)
            held = bool(digest) and await backing.holds(ref, digest)
            public = await backing.is_public(ref)
        finally:
            await session.close()
        if backing.down_reason:
            return f"unreachable ({backing.down_reason})"
        where = f"{backing.host}/{backing.repository(ref)}"
        found = [f"tag -> {tagged}"] if tagged else []
        if digest:
            found.append(f"last known digest {'held' if held else 'not held'}")
        marker = "marked public" if public else "not marked public (private or never copied)"
        return f"{where}: {', '.join(found) or 'nothing under this tag'}; {marker}"

    try:
        return asyncio.run(ask())
    except (NodekeeperError, OSError) as exc:
        return f"unknown ({exc})"


def status(config: Config, limit: int = 20) -> str:
    lines = []
    try:
        policy = policies.load(config.policy_file)
        lines.append(f"policy:  {policy.source}: valid, {len(policy.rules)} rules")
    except SettingsError as exc:
        lines.append(f"policy:  INVALID on disk (a running daemon keeps its last good "
                     f"policy): {exc}")
    now = time.time()
    # What only the running daemon knows: whether its state reaches the disk, how late
    # its event loop has run.
    running = runstatus.read(runstatus.path_for(config.listen))
    if running is None:
        lines.append(f"daemon:  not running (no status beside {config.listen})")
    else:
        lines.append(f"daemon:  pid {running.pid}; state {_stored(running.state, now)}")
        lag = running.loop_lag
        lines.append("loop:    not reported yet" if lag is None else
                     f"loop:    worst lag {lag.worst_s * 1000:.1f} ms "
                     f"({ago(now - lag.worst_at)}), last minute "
                     f"{lag.last_minute_s * 1000:.1f} ms")
        lines.append(f"outages: {len(running.outages) or 'none'}"
                     + ("" if not running.outages else
                        " (registry endpoints that did not answer; each pull for them waits "
                        "at most outage_wait)"))
        for outage in running.outages:
            lines.append(f"  {outage.endpoint}: {outage.kind} since {ago(now - outage.since)}, "
                         f"{outage.answered} pulls answered without it ({outage.detail})")
    try:
        stored = stateview.status(config.state_dir, decisions=limit)
    except StateUnreadable as exc:
        lines.append(f"state:   database unreadable in {config.state_dir} ({exc})")
        return "\n".join(lines)
    if stored is None:
        lines.append(f"state:   no database in {config.state_dir}")
        return "\n".join(lines)
    if config.backing.enabled:
        health = (f"{stored.backing.value} (since {ago(now - stored.backing.at)})"
                  if stored.backing else "no problem recorded")
        lines.append(f"backing: {config.backing.url}: {health}")
    lines.append(f"\nserved without upstream's confirmation ({len(stored.stale)}; each until "
                 "upstream confirms it again):")
    for reference, stale in stored.stale.items():
        lines.append(f"  {reference}\n      {stale.digest} since {ago(now - stale.since)} "
                     f"(upstream {stale.kind}; last answered {ago(now - stale.last)})")
    lines.append(f"\nrecent decisions (newest first, at most {limit}):")
    for decided in stored.decisions:
        lines.append(f"  {ago(now - decided.at):>10}  {decided.decision:<14} {decided.image}  "
                     f"{decided.reason[:80]}  ({decided.duration_ms:.0f} ms)")
    lines.append("\nfreshness (per reference):")
    for reference, check in stored.checks.items():
        ok = ago(now - check.ok_at) if check.ok_at else "never"
        lines.append(f"  {reference}\n      last check {ago(now - check.checked_at)}: "
                     f"{check.result}; last success {ok}; upstream {check.digest or '-'}")
    return "\n".join(lines)


def _stored(health: Health | None, now: float) -> str:
    """Whether the daemon's state reaches the disk, as `status` says it."""
    if health is None:
        return "not reported yet"
    if health.persistent and not health.key_problem:
        return "on disk"
    parts = []
    if not health.persistent:
        parts.append(f"IN MEMORY ONLY since {ago(now - health.since)}: {health.problem}; "
                     f"retrying, {health.pending} records waiting")
    if health.key_problem:
        parts.append(f"fingerprint key in memory: {health.key_problem}")
    return "; ".join(parts)
