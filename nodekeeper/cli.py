"""Command line: argument parsing only; each command lives in its own module."""

from __future__ import annotations

import argparse
import json
import sys
import time

from nodekeeper import __version__, config
from nodekeeper.commands import report
from nodekeeper.errors import SettingsError, StartupError
from nodekeeper.pull import policy
from nodekeeper.pull.reference import InvalidReference


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nodekeeper",
        description="CRI image service in front of containerd: fresh images when the "
        "registry answers, the node's copy within a bounded time when it does not.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon")
    _config_flag(serve)
    serve.add_argument("--listen", help="unix socket to serve the kubelet on")
    serve.add_argument("--containerd", help="containerd's socket")
    serve.add_argument("--state-dir", help="where nodekeeper keeps its state")
    serve.add_argument("--policy", dest="policy_file", help="the policy file")
    serve.add_argument("--metrics-address", help="host:port for /metrics; empty disables")
    serve.add_argument("--log-level", choices=config.LOG_LEVELS)
    serve.add_argument("--log-format", choices=config.LOG_FORMATS)

    check = commands.add_parser("check-config", help="validate the config file and exit")
    _config_flag(check)

    check_policy = commands.add_parser("check-policy", help="validate a policy file and exit")
    check_policy.add_argument("file", nargs="?", help="default: policy_file from the config")
    _config_flag(check_policy)

    explain = commands.add_parser(
        "explain", help="which rule matches IMAGE and what a PullImage would do now")
    explain.add_argument("image")
    explain.add_argument("--policy", help="a policy file other than the configured one")
    _output_flag(explain)
    _config_flag(explain)

    status = commands.add_parser("status", help="recent decisions and per-image freshness")
    status.add_argument("--limit", type=int, default=20, help="decisions to show")
    _output_flag(status)
    _config_flag(status)

    doctor = commands.add_parser(
        "doctor", help="check config, policy, containerd, directories and the Kubernetes "
        "identity; one line per check, exit 1 on any failure")
    doctor.add_argument("--namespace", default="default",
                        help="where to check that Events may be posted (default: default)")
    _config_flag(doctor)

    commands.add_parser("version", help="print the version")
    return parser


def _output_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text",
                        help="json: one object, as docs/operations.md describes it")


def _config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help=f"config file (default {config.DEFAULT_PATH}, used when present)"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"nodekeeper {__version__}")
        return 0
    try:
        if args.command == "check-config":
            loaded = config.load(args.config)
            print(f"{loaded.source or 'defaults'}: OK")
            return 0
        if args.command == "check-policy":
            path = args.file or config.load(args.config).policy_file
            checked = policy.load(path)
            print(f"{path}: OK, {len(checked.rules)} rules")
            return 0
        if args.command == "explain":
            facts: dict[str, object] = {}
            text = report.explain(config.load(args.config), args.image, args.policy, facts)
            print(json.dumps(facts, indent=2) if args.output == "json" else text)
            return 0
        if args.command == "doctor":
            from nodekeeper.commands import doctor

            return doctor.main(args.config, args.namespace)
        if args.command == "status":
            gathered = report.gather(config.load(args.config), args.limit)
            print(json.dumps(report.render_json(gathered), indent=2)
                  if args.output == "json" else report.render_text(gathered, time.time()))
            return 0
        overrides = config.Overrides(
            listen=args.listen, containerd=args.containerd, state_dir=args.state_dir,
            policy_file=args.policy_file, metrics_address=args.metrics_address,
            log_level=args.log_level, log_format=args.log_format,
        )
        settings = config.load(args.config, overrides)
        from nodekeeper import daemon  # grpc and friends load only for serve

        return daemon.serve(settings, overrides)
    except (SettingsError, StartupError, InvalidReference) as exc:
        print(f"nodekeeper: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # state directory, socket directory: say which, no traceback
        print(f"nodekeeper: {exc}", file=sys.stderr)
        return 1
