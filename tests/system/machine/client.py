"""Inside the system-test machine: push a small image, or pull one through a CRI socket.

    client.py push HOST:PORT REPO TAG   -> prints the image ID
    client.py pull SOCKET IMAGE         -> prints the image_ref PullImage answered
"""

import sys

# The package's own code and dependencies: the machine has no pip and no virtualenv.
sys.path[:0] = ["/usr/lib/nodekeeper/app", "/usr/lib/nodekeeper/vendor"]

import cri  # noqa: E402  (tests/harness/cri.py, copied beside this file)
import oci  # noqa: E402  (tests/harness/oci.py, copied beside this file)


def main() -> int:
    command, *args = sys.argv[1:]
    if command == "push":
        host, repo, tag = args
        print(oci.push_new(f"http://{host}", repo, tag, seed="system-test").config_digest)
    elif command == "pull":
        socket, image = args
        with cri.CriClient(socket) as client:
            print(client.pull(image))
    else:
        raise SystemExit(f"unknown command {command!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
