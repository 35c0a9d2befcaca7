# Sourced by scripts/demo.sh and scripts/test.sh: installs what nodekeeper's demo and tests
# need on Debian 12 (apt packages, then a virtualenv pinned by constraints.txt).
# Idempotent: a second run installs nothing new.

if [ "$(id -u)" -ne 0 ]; then
  echo "This needs root (it installs Debian packages and starts containerd): run it with sudo." >&2
  exit 1
fi

# containerd, docker-registry: the integration tests' real parts; runc, busybox-static,
# gcc, libc6-dev: the kubelet tier runs containers (busybox images, a pause binary built
# static); etcd-server: the store behind the real kube-apiserver of the Events tests;
# skopeo: the copy benchmark's yardstick; binutils, lintian, rpm, rpmlint: building and
# checking packages; debootstrap, systemd-container: the system test boots Debian 12
# under systemd-nspawn; prometheus: promtool checks the alert rules, and a real Prometheus
# on loopback runs the dashboard's queries (its own service stays stopped, see below).
APT_PACKAGES=(containerd docker-registry runc busybox-static gcc libc6-dev etcd-server
              skopeo python3-venv ca-certificates binutils binutils-aarch64-linux-gnu
              lintian rpm rpmlint debootstrap systemd-container prometheus)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "Installing Debian packages: ${missing[*]}"
  # The demo and tests start their own containerd and registries on loopback; keep the
  # packages' system services from starting during the install.
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && own_policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  [ "$own_policy" -eq 1 ] && rm -f "$policy"
fi

VENV=.venv
stamp="$VENV/.nodekeeper-deps"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "Setting up $VENV"
  python3 -m venv "$VENV"
  if ! "$VENV/bin/pip" install -q --disable-pip-version-check -c constraints.txt -e '.[dev]' \
       > "$VENV/pip-install.log" 2>&1; then
    cat "$VENV/pip-install.log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
