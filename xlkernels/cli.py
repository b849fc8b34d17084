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
        p.set_defaults(_run=mod.run, _parser=p)
    return parser


def main(argv=None) -> int:
    """Run one command. Exit status: 0 ok, 1 failed, 2 bad usage (argparse) or a bad file (FileError:
    one line naming the option and the file, checked before any model is loaded), 130 interrupted."""
    from xlkernels.files import FileError

    from .commands._files import check_files, describe
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    prefix = f"xlkernels {args.command}: error:"
    try:
        check_files(args._parser, args)
        return int(args._run(args) or 0)
    except Exception as e:
        if getattr(args, "debug", False):
            raise
        if isinstance(e, FileError):
            print(f"{prefix} {_line(describe(e, args._parser, args))}", file=sys.stderr)
            return 2
        if isinstance(e, (ValueError, TypeError, OSError, RuntimeError)):
            print(f"{prefix} {_line(e)}", file=sys.stderr)
        else:   # a bug: still one line; --debug shows the traceback
            print(f"{prefix} internal error {type(e).__name__}: {_line(e)} (rerun with --debug for the traceback)",
                  file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"xlkernels {args.command}: interrupted", file=sys.stderr)
        return 130


def _line(msg) -> str:
    return " ".join(str(msg).splitlines())


if __name__ == "__main__":
    raise SystemExit(main())
