"""The `xlkernels` command line. Each subcommand lives in xlkernels/commands/<name>.py and
exposes HELP, EXAMPLES, add_arguments(parser) and run(args) -> int."""
import argparse
import importlib
import sys

COMMANDS = ("info", "heads", "neurons", "shift", "steer", "align", "eval", "reproduce", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xlkernels",
        description="Steer and instrument multilingual LLMs with fused kernels.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `xlkernels <command> --help` for a command's options and examples.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"xlkernels.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"xlkernels.commands.{name}":
                raise
            continue
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP,
                           epilog="examples:\n" + mod.EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"xlkernels {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
