#!/bin/bash
# Inside the booted Debian 12 machine: install nodekeeper's .deb under the real systemd
# and check what an operator relies on. One line per check goes to /out/results
# ("NAME ok|fail DETAIL"); then the machine powers off.
exec >/out/runner.log 2>&1
set -x
results=/out/results
: > "$results"
check() {  # check NAME CONDITION-EXIT-CODE DETAIL
    if [ "$2" -eq 0 ]; then echo "$1 ok $3" >> "$results"; else echo "$1 fail $3" >> "$results"; fi
}
client() { /usr/bin/python3 -s -E /opt/systest/client.py "$@"; }
active() { [ "$(systemctl is-active "$1")" = active ]; }
image=127.0.0.1:5000/demo/app:latest

# containerd: the native snapshotter works wherever overlay mounts are not allowed.
mkdir -p /etc/containerd
containerd config default | sed 's/snapshotter = "overlayfs"/snapshotter = "native"/' \
    > /etc/containerd/config.toml
systemctl restart containerd
# The registry listens on loopback only.
cat > /etc/docker/registry/config.yml <<'YAML'
version: 0.1
storage:
  filesystem:
    rootdirectory: /var/lib/docker-registry
  delete:
    enabled: true
http:
  addr: 127.0.0.1:5000
YAML
systemctl restart docker-registry

apt-get install -y /opt/systest/nodekeeper.deb
check install $? "apt-get install ./nodekeeper.deb"
# The alert rules and the dashboard an operator loads into Prometheus and Grafana.
dpkg -S /usr/share/nodekeeper/nodekeeper-alerts.yaml >/dev/null \
  && grep -q '^groups:' /usr/share/nodekeeper/nodekeeper-alerts.yaml \
  && python3 -c 'import json, sys; assert json.load(open(sys.argv[1]))["panels"]' \
       /usr/share/nodekeeper/nodekeeper-dashboard.json
check monitoring_files $? "$(ls -l /usr/share/nodekeeper/ 2>&1)"
for _ in $(seq 50); do active nodekeeper && break; sleep 0.1; done
active containerd; check containerd_active $? "$(systemctl is-active containerd)"
active nodekeeper; check nodekeeper_active $? "$(systemctl is-active nodekeeper)"
status=$(systemctl show -p StatusText --value nodekeeper)
[[ "$status" == Serving* ]]; check ready_status $? "$status"

pushed=$(client push 127.0.0.1:5000 demo/app latest)
pulled=$(client pull /run/nodekeeper/cri.sock "$image")
[ -n "$pushed" ] && [ "$pulled" = "$pushed" ]; check pull $? "pushed=$pushed pulled=$pulled"

systemctl stop docker-registry
sleep 0.5  # past the 0.2 s in which identical pulls share one decision
cached=$(client pull /run/nodekeeper/cri.sock "$image")
[ -n "$pushed" ] && [ "$cached" = "$pushed" ]; check fallback_pull $? "answered=$cached"
journalctl -u nodekeeper -p warning --no-pager | grep -q "answering with the node's copy"
check journal_fallback $? "journalctl -u nodekeeper -p warning"

printf 'defaults:\n  update: never\n' > /etc/nodekeeper/policy.yaml
systemctl reload nodekeeper
reloaded=$?
sleep 0.5
journalctl -u nodekeeper --no-pager | grep '"policy loaded"' | grep -q '"trigger": "SIGHUP"'
loaded=$?
[ "$reloaded" = 0 ] && [ "$loaded" = 0 ]
check reload $? "systemctl reload exit $reloaded; SIGHUP reload logged: $loaded"
sleep 0.3
client pull /run/nodekeeper/cri.sock "$image" >/dev/null
journalctl -u nodekeeper --no-pager | grep '"rpc": "PullImage"' | tail -1 | grep -q local-pinned
check reload_applied $? "the pull after the reload followed update: never"

# An upgrade over a broken, locally edited config keeps the running daemon and says why.
before=$(systemctl show -p MainPID --value nodekeeper)
cp /etc/nodekeeper/config.yaml /tmp/config.yaml
echo "bogus_key: 1" >> /etc/nodekeeper/config.yaml
upgrade=$(apt-get install --reinstall -y /opt/systest/nodekeeper.deb 2>&1)
after=$(systemctl show -p MainPID --value nodekeeper)
grep -q "bogus_key: unknown key" <<<"$upgrade" && [ "$before" = "$after" ] && active nodekeeper
check upgrade_with_broken_config $? "pid $before -> $after"
cp /tmp/config.yaml /etc/nodekeeper/config.yaml

# containerd gone: nodekeeper keeps running and says so.
systemctl stop containerd
sleep 1
active nodekeeper && journalctl -u nodekeeper --no-pager | grep -q "containerd unreachable"
check without_containerd $? "$(systemctl is-active nodekeeper)"
systemctl start containerd

# A missing policy file: a clear error, and restarts no faster than RestartSec (1 s).
mv /etc/nodekeeper/policy.yaml /tmp/policy.yaml
restarts_before=$(systemctl show -p NRestarts --value nodekeeper)
systemctl restart nodekeeper
sleep 3
restarts=$(( $(systemctl show -p NRestarts --value nodekeeper) - restarts_before ))
journalctl -u nodekeeper --no-pager | grep -q "/etc/nodekeeper/policy.yaml: cannot read" \
    && [ "$restarts" -le 3 ]
check missing_policy $? "$restarts restarts in 3 s"
mv /tmp/policy.yaml /etc/nodekeeper/policy.yaml
systemctl reset-failed nodekeeper
systemctl restart nodekeeper
for _ in $(seq 50); do active nodekeeper && break; sleep 0.1; done

old=$(systemctl show -p MainPID --value nodekeeper)
[ "$old" -gt 1 ] && kill -9 "$old"  # never "kill -9 0": that is this whole process group
start=$(date +%s%N)
back=1
# RestartSec is 1 s; the bound is loose because a shared machine may be slow to start
# Python. What is checked is that systemd brings it back by itself.
for _ in $(seq 200); do
    pid=$(systemctl show -p MainPID --value nodekeeper)
    if active nodekeeper && [ "$pid" != 0 ] && [ "$pid" != "$old" ]; then back=0; break; fi
    sleep 0.05
done
elapsed_ms=$(( ($(date +%s%N) - start) / 1000000 ))
[ "$back" = 0 ] && [ "$elapsed_ms" -le 10000 ]; check restart_after_sigkill $? "${elapsed_ms}ms"

apt-get remove -y nodekeeper
! active nodekeeper && [ -d /var/lib/nodekeeper ]
check remove_keeps_state $? "$(systemctl is-active nodekeeper); $(ls -ld /var/lib/nodekeeper)"
apt-get purge -y nodekeeper
[ ! -e /var/lib/nodekeeper ]; check purge_removes_state $? "$(ls -ld /var/lib/nodekeeper 2>&1)"

journalctl -u nodekeeper --no-pager > /out/nodekeeper.journal
echo done > /out/done
systemctl poweroff
