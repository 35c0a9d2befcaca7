#!/bin/sh
# /usr/bin/nodekeeper: run nodekeeper on the first installed Python it was packaged for.
# The package carries its own dependencies under /usr/lib/nodekeeper/vendor, with grpcio's
# extension built for each supported CPython; nothing is fetched at install or run time.
for python in python3.12 python3.11 python3.10 python3; do
    path=$(command -v "$python" 2>/dev/null) || continue
    tag=$("$path" -c 'import sys; print("%d%d" % sys.version_info[:2])' 2>/dev/null) || continue
    for extension in /usr/lib/nodekeeper/vendor/grpc/_cython/cygrpc.cpython-"$tag"-*.so; do
        # Bytecode goes to /var/cache (systemd's CacheDirectory=): /usr stays untouched.
        [ -e "$extension" ] && exec "$path" -s -E \
            -X pycache_prefix=/var/cache/nodekeeper/pycache /usr/lib/nodekeeper/launch.py "$@"
    done
done
echo "nodekeeper: no supported Python found (3.10, 3.11 or 3.12; install python3.11 or python3.12)" >&2
exit 1
