"""`nodekeeper explain` and `nodekeeper status`: read-only views for operators.

Both read the state database beside a running daemon (read-only, WAL) and ask
containerd what the node holds; neither sends anything to a registry.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import replace
from pathlib import Path

from nodekeeper.config import Config
from nodekeeper.containerd.client import Containerd
from nodekeeper.errors import NodekeeperError, SettingsError
from nodekeeper.failures import Kind
from nodekeeper.host import runstatus
from nodekeeper.pull import policy as policies
from nodekeeper.pull.credentials import ANONYMOUS
from nodekeeper.pull.decision import (
    Access,
    AskBacking,
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
from nodekeeper.state.memory import DB_NAME, read_only
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


def _db(config: Config) -> sqlite3.Connection | None:
    if not (Path(config.state_dir) / DB_NAME).exists():
        return None
    try:
        return read_only(config.state_dir)
    except sqlite3.Error:
        return None


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
    db = _db(config)
    last_ok = None
    last_digest = ""
    public = False
    if db is None:
        lines.append("last check:  none recorded (no state database yet)")
    else:
        row = db.execute("SELECT checked_at, result, ok_at, digest FROM checks "
                         "WHERE reference = ?", (str(ref),)).fetchone()
        if row:
            last_ok, last_digest = row[2], row[3]
            ok = f"; last success {ago(time.time() - row[2])}" if row[2] else ""
            lines.append(f"last check:  {ago(time.time() - row[0])}: {row[1]}{ok}"
                         + (f", upstream {row[3]}" if row[3] else ""))
        else:
            lines.append("last check:  never")
        kinds = [r[0] for r in db.execute(
            "SELECT fingerprint FROM access WHERE repository = ?", (ref.repository,))]
        public = ANONYMOUS in kinds
        named = len([k for k in kinds if k != ANONYMOUS])
        lines.append("access:      " + ("anonymous pulls seen to work" if public else
                                        "no anonymous pull recorded")
                     + f"; {named} credential fingerprint(s) seen to work")
        db.close()
    pull = Pull(ref, rule.label, s, local, Access(public=public), time.time(), last_ok,
                last_digest, backing=config.backing.enabled and config.backing.read)
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
    view = runstatus.read(runstatus.path_for(config.listen))
    if view is None:
        lines.append(f"daemon:  not running (no status beside {config.listen})")
    else:
        health = view.get("state") or {}
        if not health:
            stored = "not reported yet"
        elif health.get("persistent") and not health.get("key_problem"):
            stored = "on disk"
        else:
            stored = "; ".join(
                ([f"IN MEMORY ONLY since {ago(now - health.get('since', now))}: "
                  f"{health.get('problem')}; retrying, {health.get('pending', 0)} records "
                  "waiting"] if not health.get("persistent") else [])
                + ([f"fingerprint key in memory: {health['key_problem']}"]
                   if health.get("key_problem") else []))
        lag = view.get("loop_lag") or {}
        lines.append(f"daemon:  pid {view['pid']}; state {stored}")
        lines.append(f"loop:    worst lag {lag.get('worst_s', 0) * 1000:.1f} ms "
                     f"({ago(now - lag.get('worst_at', now))}), last minute "
                     f"{lag.get('last_minute_s', 0) * 1000:.1f} ms")
    db = _db(config)
    if db is None:
        exists = (Path(config.state_dir) / DB_NAME).exists()
        lines.append(f"state:   {'database unreadable' if exists else 'no database'} in "
                     f"{config.state_dir}")
        return "\n".join(lines)
    if config.backing.enabled:
        try:
            row = db.execute("SELECT value, at FROM meta WHERE key = 'backing'").fetchone()
        except sqlite3.Error:  # a database from before the daemon's last upgrade
            row = None
        health = f"{row[0]} (since {ago(now - row[1])})" if row else "no problem recorded"
        lines.append(f"backing: {config.backing.url}: {health}")
    try:
        stale = db.execute("SELECT reference, digest, kind, since, last FROM stale "
                           "ORDER BY since").fetchall()
    except sqlite3.Error:  # a database from before the daemon's last upgrade
        stale = []
    lines.append(f"\nserved without upstream's confirmation ({len(stale)}; each until "
                 "upstream confirms it again):")
    for reference, digest, kind, since, last in stale:
        lines.append(f"  {reference}\n      {digest} since {ago(now - since)} (upstream "
                     f"{kind}; last answered {ago(now - last)})")
    lines.append(f"\nrecent decisions (newest first, at most {limit}):")
    for at, image, decision, reason, ms in db.execute(
            "SELECT at, image, decision, reason, duration_ms FROM decisions "
            "ORDER BY id DESC LIMIT ?", (limit,)):
        lines.append(f"  {ago(now - at):>10}  {decision:<14} {image}  "
                     f"{reason[:80]}  ({ms:.0f} ms)")
    lines.append("\nfreshness (per reference):")
    for reference, checked_at, result, ok_at, digest in db.execute(
            "SELECT reference, checked_at, result, ok_at, digest FROM checks "
            "ORDER BY reference"):
        ok = ago(now - ok_at) if ok_at else "never"
        lines.append(f"  {reference}\n      last check {ago(now - checked_at)}: {result}; "
                     f"last success {ok}; upstream {digest or '-'}")
    db.close()
    return "\n".join(lines)
