"""`nodekeeper explain` and `nodekeeper status`: read-only views for operators.

Both read the state database beside a running daemon through state/view.py (read-only;
the daemon keeps it with a rollback journal, never WAL) and ask containerd what the node
holds; neither sends anything to a registry.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import Any

from nodekeeper.behind import Behind
from nodekeeper.config import Config
from nodekeeper.containerd.client import Containerd
from nodekeeper.errors import NodekeeperError, SettingsError, StateUnreadable
from nodekeeper.failures import Kind
from nodekeeper.host import behindtag, runstatus
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


EXPLAIN_SCHEMA = "nodekeeper.explain/v1"


def explain(config: Config, image: str, policy_path: str | None,
            facts: dict[str, Any] | None = None) -> str:
    """The text `explain` prints; `facts`, when given, receives the same as `explain -o
    json` prints it (docs/operations.md describes it)."""
    ref = parse(image)
    policy = policies.load(policy_path or config.policy_file)
    rule = policy.rule_for(ref)
    s = rule.settings
    out: dict[str, Any] = {} if facts is None else facts
    out.update({
        "schema": EXPLAIN_SCHEMA, "image": image, "reference": str(ref),
        "repository": ref.repository, "rule": rule.label, "policy_file": policy.source,
        "settings": {"update": str(s.update), "interval_seconds": s.interval,
                     "probe_timeout_seconds": s.probe_timeout,
                     "auth_fallback": str(s.auth_fallback),
                     "fallback_on": sorted(k.value for k in s.fallback_on)},
        "on_node": None, "on_node_error": None, "last_check": None,
        "access": None, "state_error": None, "backing": None,
    })
    lines = [
        f"image:       {image}",
        f"reference:   {ref}  (repository {ref.repository})",
        f"rule:        {rule.label} from {policy.source}",
        f"settings:    update={s.update} interval={s.interval:g}s "
        f"probe_timeout={s.probe_timeout:g}s auth_fallback={s.auth_fallback}",
        f"             fallback_on={','.join(sorted(k.value for k in s.fallback_on))}",
    ]
    local, problem = _local(config, str(ref))
    out["on_node"] = ({"image_id": local.image_id, "digest": local.digest or None}
                      if local else None)
    out["on_node_error"] = problem_or_none(problem)
    lines.append("on node:     " + (problem or (
        f"{local.image_id} (points at {local.digest or 'unknown digest'})" if local
        else "no copy")))
    last_ok = None
    last_digest = ""
    public = False
    try:
        recorded = stateview.reference(config.state_dir, str(ref), ref.repository)
    except StateUnreadable as exc:
        out["state_error"] = str(exc)
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
                out["last_check"] = {"checked_at": check.checked_at, "result": check.result,
                                     "ok_at": check.ok_at, "digest": check.digest or None}
                ok = f"; last success {ago(time.time() - check.ok_at)}" if check.ok_at else ""
                lines.append(f"last check:  {ago(time.time() - check.checked_at)}: "
                             f"{check.result}{ok}"
                             + (f", upstream {check.digest}" if check.digest else ""))
            out["access"] = {"anonymous": public,
                             "credentials": recorded.access.credentials}
            lines.append("access:      " + ("anonymous pulls seen to work" if public else
                                            "no anonymous pull recorded")
                         + f"; {recorded.access.credentials} credential fingerprint(s) seen "
                           "to work")
    pull = Pull(ref, rule.label, s, local, Access(public=public), time.time(), last_ok,
                last_digest, backing=config.backing.enabled and config.backing.read,
                shared_checks=config.backing.cluster)
    out["would"] = _describe(next_step(pull), s, ref)
    lines.append(f"would:       {out['would']}  [for a pull without credentials]")
    if config.backing.enabled:
        out["backing"] = _backing_view(config, ref, last_digest)
        lines.append("backing:     " + out["backing"])
    # The same decision, as it would go if upstream did not answer now.
    down = pull.after(Probe(), Failed(Kind.UNREACHABLE, "no answer"))
    out["if_upstream_fails"] = _describe(next_step(down), s, ref)
    lines.append(f"if upstream fails: {out['if_upstream_fails']}")
    out["if_upstream_fails_for_credentials_seen_to_work"] = None
    if not public:
        known = replace(down, access=Access(these=True, anonymous=False))
        out["if_upstream_fails_for_credentials_seen_to_work"] = _describe(
            next_step(known), s, ref)
        lines.append("  for credentials seen to work: "
                     + out["if_upstream_fails_for_credentials_seen_to_work"])
    return "\n".join(lines)


def problem_or_none(problem: str) -> str | None:
    return problem or None


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


@dataclass(frozen=True, kw_only=True)
class StatusReport:
    """Everything `status` shows, read once; rendered as text or as JSON."""

    policy_file: str
    policy_rules: int | None  # None when the policy on disk is invalid
    policy_error: str
    listen: str
    running: runstatus.RunStatus | None  # None when no daemon runs
    state_dir: str
    stored: stateview.StatusView | None  # None when unread (see state_error) or absent
    state_error: str
    backing_url: str  # '' when no backing registry is configured
    behind: list[Behind] | None  # None when containerd could not say (see behind_error)
    behind_error: str
    limit: int


def gather(config: Config, limit: int = 20) -> StatusReport:
    rules, policy_error = None, ""
    try:
        rules = len(policies.load(config.policy_file).rules)
    except SettingsError as exc:
        policy_error = str(exc)
    stored, state_error = None, ""
    try:
        stored = stateview.status(config.state_dir, decisions=limit)
    except StateUnreadable as exc:
        state_error = str(exc)
    behind, behind_error = _behind(config)
    return StatusReport(
        policy_file=config.policy_file, policy_rules=rules, policy_error=policy_error,
        listen=config.listen, running=runstatus.read(runstatus.path_for(config.listen)),
        state_dir=config.state_dir, stored=stored, state_error=state_error,
        backing_url=config.backing.url if config.backing.enabled else "",
        behind=behind, behind_error=behind_error, limit=limit)


def _behind(config: Config) -> tuple[list[Behind] | None, str]:
    async def ask() -> list[Behind]:
        containerd = Containerd(config.containerd.address, config.containerd.namespace)
        try:
            return await behindtag.survey(containerd, config.state_dir)
        finally:
            await containerd.close()

    try:
        return asyncio.run(asyncio.wait_for(ask(), 10)), ""
    except (NodekeeperError, asyncio.TimeoutError) as exc:
        return None, f"containerd at {config.containerd.address}: {exc or 'timeout'}"


def status(config: Config, limit: int = 20) -> str:
    return render_text(gather(config, limit), time.time())


def render_text(report: StatusReport, now: float) -> str:
    lines = []
    if report.policy_rules is not None:
        lines.append(f"policy:  {report.policy_file}: valid, {report.policy_rules} rules")
    else:
        lines.append(f"policy:  INVALID on disk (a running daemon keeps its last good "
                     f"policy): {report.policy_error}")
    # What only the running daemon knows: whether its state reaches the disk, how late
    # its event loop has run.
    running = report.running
    if running is None:
        lines.append(f"daemon:  not running (no status beside {report.listen})")
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
    if report.state_error:
        lines.append(f"state:   database unreadable in {report.state_dir} "
                     f"({report.state_error})")
        return "\n".join(lines)
    stored = report.stored
    if stored is None:
        lines.append(f"state:   no database in {report.state_dir}")
        return "\n".join(lines)
    if report.backing_url:
        health = (f"{stored.backing.value} (since {ago(now - stored.backing.at)})"
                  if stored.backing else "no problem recorded")
        lines.append(f"backing: {report.backing_url}: {health}")
    lines.append(f"\nserved without upstream's confirmation ({len(stored.stale)}; each until "
                 "upstream confirms it again):")
    for reference, stale in stored.stale.items():
        lines.append(f"  {reference}\n      {stale.digest} since {ago(now - stale.since)} "
                     f"(upstream {stale.kind}; last answered {ago(now - stale.last)})")
    if report.behind is None:
        lines.append(f"\ncontainers behind their tag: unknown ({report.behind_error})")
    else:
        lines.append(f"\ncontainers behind their tag ({len(report.behind)}; restart the pod "
                     "to run the tag's build):")
    for behind in report.behind or []:
        running_container = behind.running
        lines.append(f"  {running_container.namespace}/{running_container.pod} "
                     f"{running_container.container}: {behind.reference}\n"
                     f"      runs {behind.runs}; the tag is {behind.latest.digest} since "
                     f"{ago(now - behind.latest.since)}")
    lines.append(f"\nrecent decisions (newest first, at most {report.limit}):")
    for decided in stored.decisions:
        lines.append(f"  {ago(now - decided.at):>10}  {decided.decision:<14} {decided.image}  "
                     f"{decided.reason[:80]}  ({decided.duration_ms:.0f} ms)")
    lines.append("\nfreshness (per reference):")
    for reference, check in stored.checks.items():
        ok = ago(now - check.ok_at) if check.ok_at else "never"
        lines.append(f"  {reference}\n      last check {ago(now - check.checked_at)}: "
                     f"{check.result}; last success {ok}; upstream {check.digest or '-'}")
    return "\n".join(lines)


# The version of the JSON `status -o json` prints (docs/operations.md describes it): a
# field may be added within a version, never removed or changed in meaning.
STATUS_SCHEMA = "nodekeeper.status/v1"


def render_json(report: StatusReport) -> dict[str, Any]:
    """`status -o json`: times are Unix seconds, absent values null."""
    running = report.running
    stored = report.stored
    daemon = None
    if running is not None:
        health, lag = running.state, running.loop_lag
        daemon = {
            "pid": running.pid,
            "state": None if health is None else {
                "persistent": health.persistent, "problem": health.problem or None,
                "since": health.since if not health.persistent else None,
                "pending": health.pending, "key_problem": health.key_problem or None},
            "loop_lag": None if lag is None else {
                "worst_seconds": lag.worst_s, "worst_at": lag.worst_at,
                "last_minute_seconds": lag.last_minute_s},
            "outages": [{"endpoint": outage.endpoint, "since": outage.since,
                         "kind": outage.kind.value, "detail": outage.detail,
                         "pulls_answered": outage.answered} for outage in running.outages],
        }
    return {
        "schema": STATUS_SCHEMA,
        "policy": {"file": report.policy_file, "valid": report.policy_rules is not None,
                   "rules": report.policy_rules, "error": report.policy_error or None},
        "daemon": daemon,
        "state": {"directory": report.state_dir, "database": stored is not None,
                  "error": report.state_error or None},
        "backing": None if not report.backing_url else {
            "url": report.backing_url,
            "problem": stored.backing.value if stored and stored.backing else None,
            "since": stored.backing.at if stored and stored.backing else None},
        "stale": [{"reference": reference, "digest": stale.digest, "kind": stale.kind,
                   "since": stale.since, "last": stale.last}
                  for reference, stale in (stored.stale.items() if stored else ())],
        "behind_tag": None if report.behind is None else [{
            "namespace": b.running.namespace, "pod": b.running.pod,
            "container": b.running.container, "container_id": b.running.container_id,
            "reference": b.reference, "runs": b.runs, "image_id": b.running.image_id,
            "tag_digest": b.latest.digest, "since": b.latest.since,
            "started_at": b.running.started_at} for b in report.behind],
        "behind_tag_error": report.behind_error or None,
        "decisions": [{"at": d.at, "image": d.image, "rule": d.rule, "decision": d.decision,
                       "reason": d.reason, "local_digest": d.local_digest or None,
                       "upstream_digest": d.upstream_digest or None,
                       "duration_ms": d.duration_ms}
                      for d in (stored.decisions if stored else ())],
        "checks": [{"reference": reference, "checked_at": c.checked_at, "result": c.result,
                    "ok_at": c.ok_at, "digest": c.digest or None}
                   for reference, c in (stored.checks.items() if stored else ())],
    }


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
