"""`nodekeeper explain` and `nodekeeper status`: read-only views for operators.

Both read the state database beside a running daemon (read-only, WAL) and ask
containerd what the node holds; neither sends anything to a registry.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from nodekeeper import policy as policies
from nodekeeper import runstatus
from nodekeeper.backing import Backing
from nodekeeper.config import Config
from nodekeeper.containerd import Containerd, LocalImage
from nodekeeper.credentials import ANONYMOUS
from nodekeeper.errors import NodekeeperError, SettingsError
from nodekeeper.reference import Reference, parse
from nodekeeper.registry import Session
from nodekeeper.registry.copy import Copier
from nodekeeper.state import DB_NAME, read_only


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _local(config: Config, name: str) -> tuple[LocalImage | None, str]:
    async def ask() -> LocalImage | None:
        containerd = Containerd(config.containerd.address, config.containerd.namespace)
        try:
            return await containerd.local_image(name)
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
        f"reference:   {ref}  (name {ref.name})",
        f"rule:        {rule.label} from {policy.source}",
        f"settings:    update={s.update} interval={s.interval:g}s "
        f"probe_timeout={s.probe_timeout:g}s auth_fallback={s.auth_fallback}",
        f"             fallback_on={','.join(sorted(s.fallback_on))}",
    ]
    local, problem = _local(config, str(ref))
    lines.append("on node:     " + (problem or (
        f"{local.id} (points at {local.digest or 'unknown digest'})" if local else "no copy")))
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
            ok = f"; last success {_age(time.time() - row[2])}" if row[2] else ""
            lines.append(f"last check:  {_age(time.time() - row[0])}: {row[1]}{ok}"
                         + (f", upstream {row[3]}" if row[3] else ""))
        else:
            lines.append("last check:  never")
        kinds = [r[0] for r in db.execute(
            "SELECT fingerprint FROM access WHERE repository = ?", (ref.name,))]
        public = ANONYMOUS in kinds
        named = len([k for k in kinds if k != ANONYMOUS])
        lines.append("access:      " + ("anonymous pulls seen to work" if public else
                                        "no anonymous pull recorded")
                     + f"; {named} credential fingerprint(s) seen to work")
        db.close()
    step = policies.plan(s, ref, local is not None, last_ok, time.time(), verified=public)
    doing = {
        "local": f"answer the node's copy without network ({step.decision}: {step.reason})",
        "probe": "ask upstream for the digest within "
                 f"{s.probe_timeout:g}s, pull if it changed" + (
                     f" ({step.reason})" if step.reason else ""),
        "pull": "hand the pull to containerd (nothing on the node to compare with)",
    }[step.action]
    lines.append(f"would:       {doing}  [for a pull without credentials]")
    if config.backing.enabled:
        lines.append("backing:     " + _backing_view(config, ref, last_digest))
    if local is None:
        fallback = "nothing to fall back to: the pull fails with the upstream error"
    elif public:
        fallback = f"serve the node's copy for {','.join(sorted(s.fallback_on))}"
    elif s.auth_fallback == "never":
        fallback = "refuse: the repository needs credentials and auth_fallback is never"
    else:
        fallback = "serve the node's copy only to credentials recorded as having worked"
    lines.append(f"if upstream fails: {fallback}")
    return "\n".join(lines)


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
                ([f"IN MEMORY ONLY since {_age(now - health.get('since', now))}: "
                  f"{health.get('problem')}; retrying, {health.get('pending', 0)} records "
                  "waiting"] if not health.get("persistent") else [])
                + ([f"fingerprint key in memory: {health['key_problem']}"]
                   if health.get("key_problem") else []))
        lag = view.get("loop_lag") or {}
        lines.append(f"daemon:  pid {view['pid']}; state {stored}")
        lines.append(f"loop:    worst lag {lag.get('worst_s', 0) * 1000:.1f} ms "
                     f"({_age(now - lag.get('worst_at', now))}), last minute "
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
        health = f"{row[0]} (since {_age(now - row[1])})" if row else "no problem recorded"
        lines.append(f"backing: {config.backing.url}: {health}")
    lines.append(f"\nrecent decisions (newest first, at most {limit}):")
    for at, image, decision, reason, ms in db.execute(
            "SELECT at, image, decision, reason, duration_ms FROM decisions "
            "ORDER BY id DESC LIMIT ?", (limit,)):
        lines.append(f"  {_age(now - at):>10}  {decision:<14} {image}  "
                     f"{reason[:80]}  ({ms:.0f} ms)")
    lines.append("\nfreshness (per reference):")
    for reference, checked_at, result, ok_at, digest in db.execute(
            "SELECT reference, checked_at, result, ok_at, digest FROM checks "
            "ORDER BY reference"):
        ok = _age(now - ok_at) if ok_at else "never"
        lines.append(f"  {reference}\n      last check {_age(now - checked_at)}: {result}; "
                     f"last success {ok}; upstream {digest or '-'}")
    db.close()
    return "\n".join(lines)
