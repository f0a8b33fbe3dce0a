"""`hf-moe` command line: thin typed subcommands over the library. Library functions raise; only this module
turns errors into messages and exit codes (0 ok, 1 unexpected failure, 2 bad input)."""

import argparse
import logging
import sys
from collections.abc import Callable

# Each feature adds one `_add_<name>(subparsers)` function below and lists it in SUBCOMMANDS. A subcommand
# parser sets `func=<callable taking the parsed args, returning an exit code or None>`.
AddCommand = Callable[[argparse._SubParsersAction], None]


# [conversion commands: upcycle, merge]

# [export / serve commands]

# [peft commands: lora-targets]

# [hub commands: card, push, zoo, inspect]

# [training commands]

SUBCOMMANDS: list[AddCommand] = [
    # [SUBCOMMANDS list: add your _add_* functions here, one per line]
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="hf-moe", description="Mixture-of-Experts for the Hugging Face ecosystem.")
    parser.add_argument("--version", action="version", version=f"hf-moe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError) as err:
        print(f"hf-moe {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hf-moe {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
