"""The `fisherguard` command (docs/cli.md): one module per subcommand, each parsing its flags and
calling the library. Subcommands import the laboratory lazily, so `fisherguard serve` never loads it."""

import argparse
import sys

from service.cli import bundle, calibrate, evaluate, examples, fit_detector, inspect, serve, train

COMMANDS = (serve, bundle, calibrate, evaluate, examples, train, inspect, fit_detector)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fisherguard", description="Fisher-information detection of adversarial images.")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        return int(a.func(a))
    except (ValueError, FileNotFoundError) as e:
        print(f"fisherguard {a.command}: error: {e}", file=sys.stderr)
        return 2
