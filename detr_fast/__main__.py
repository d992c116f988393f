"""Command line: `python -m detr_fast profile [...]`."""
import argparse
import sys
from typing import List, Optional

from .measure import cli as profile_cli


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detr_fast")
    commands = parser.add_subparsers(dest="command", required=True)
    profile_cli.add_arguments(commands.add_parser(
        "profile", help="time the backbone stage (or a whole detector: --model), reference vs detr_fast"))
    args = parser.parse_args(argv)
    if args.command == "profile":
        return profile_cli.main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
