#!/usr/bin/env bash
# Builds dist/nodekeeper_<version>-1_{amd64,arm64}.deb and
# dist/nodekeeper-<version>-1.{x86_64,aarch64}.rpm.
# The packages carry nodekeeper and its Python dependencies, built for CPython 3.10, 3.11
# and 3.12 (Debian 12, Ubuntu 22.04/24.04, RHEL 9's python3.11/3.12): installing them
# needs no pip and no network. Run from anywhere, as root; sets up what the build needs
# first (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
PY=.venv/bin/python
VERSION=$("$PY" -c 'import nodekeeper; print(nodekeeper.__version__)')
export VERSION
PYTHONS=(3.10 3.11 3.12)
# Debian architecture, the wheels' platform tag, the newer tag google-re2's wheels carry
# (glibc 2.28; Debian 12 has 2.36, Ubuntu 22.04 2.35, RHEL 9 2.34), and a strip that reads
# its binaries.
ARCHES=("amd64 manylinux2014_x86_64 manylinux_2_28_x86_64 strip"
        "arm64 manylinux2014_aarch64 manylinux_2_28_aarch64 aarch64-linux-gnu-strip")

rm -rf build/package build/wheels
mkdir -p build/package/doc/examples build/wheels dist
install -m 0644 README.md docs/operations.md docs/security.md docs/kubelet.md \
    build/package/doc/
install -m 0644 packaging/examples/* build/package/doc/examples/
install -m 0644 packaging/copyright build/package/doc/copyright
gzip -9n -c packaging/nodekeeper.1 > build/package/nodekeeper.1.gz
gzip -9n -c packaging/changelog.Debian > build/package/changelog.Debian.gz
# The RPM's %changelog comes from changelog.yml; nfpm would write it into the .deb too, in
# a form lintian refuses, so only the RPM build sees it.
{ cat packaging/nfpm.yaml; echo "changelog: packaging/changelog.yml"; } > build/nfpm-rpm.yaml
# sdnotify is published as a source archive only: make its (pure Python) wheel here.
"$PY" -m pip wheel -q --no-deps -c constraints.txt -w build/wheels sdnotify

vendor() {  # vendor DIR PYTHON-VERSION PIP-ARGS...
    "$PY" -m pip install -q --disable-pip-version-check --no-compile \
        --target "$1" --python-version "$2" \
        --implementation cp --platform "$PLATFORM" --only-binary=:all: \
        --find-links build/wheels -c constraints.txt "${@:3}"
}

for entry in "${ARCHES[@]}"; do
    read -r ARCH OLDER NEWER STRIP <<<"$entry"
    export ARCH
    PLATFORM=$OLDER
    LIB=build/package/lib
    rm -rf "$LIB" build/native-*
    find nodekeeper -name '*.py' -o -name '*.pyi' | while read -r file; do
        install -D -m 0644 "$file" "$LIB/app/$file"
    done
    install -m 0644 packaging/launch.py "$LIB/launch.py"
    # One tree serves every Python: all dependencies are pure Python or abi3 (protobuf)
    # except three extensions whose file names carry the CPython version
    # (cygrpc.cpython-311-x86_64-linux-gnu.so): grpcio's, PyYAML's libyaml parser and
    # google-re2's, so the builds for 3.10, 3.11 and 3.12 sit side by side. tomli and
    # exceptiongroup are what 3.10 lacks.
    vendor "$LIB/vendor" 3.11 httpx pyyaml sdnotify structlog prometheus-client protobuf grpcio
    PLATFORM=$NEWER vendor "$LIB/vendor" 3.11 --no-deps google-re2
    vendor "$LIB/vendor" 3.10 --no-deps tomli exceptiongroup
    for version in "${PYTHONS[@]}"; do
        native=build/native-$version
        vendor "$native" "$version" --no-deps grpcio pyyaml
        PLATFORM=$NEWER vendor "$native" "$version" --no-deps google-re2
        cp "$native"/grpc/_cython/cygrpc.cpython-*.so "$LIB/vendor/grpc/_cython/"
        cp "$native"/yaml/_yaml.cpython-*.so "$LIB/vendor/yaml/"
        cp "$native"/re2/_re2.cpython-*.so "$LIB/vendor/re2/"
    done
    find "$LIB" -depth -name '__pycache__' -exec rm -rf {} +
    rm -rf "$LIB/vendor/bin"
    find "$LIB" -name '*.h' -delete
    # Modules, not scripts: drop the shebangs some vendored files carry.
    grep -rl --include='*.py' -m1 '^#!' "$LIB" | xargs -r sed -i '1{/^#!/d}'
    find "$LIB" -name '*.so' -exec "$STRIP" --strip-unneeded {} +
    find "$LIB" -type f -exec chmod 0644 {} +

    .venv/bin/nfpm pkg --config packaging/nfpm.yaml --packager deb --target dist/
    .venv/bin/nfpm pkg --config build/nfpm-rpm.yaml --packager rpm --target dist/
done
ls -l dist/
