"""Run every bench/bench_*.py module's main(argv); keep going when one fails and print a summary.

python -m bench.run_all [--quick] [--only NAME ...] [--list]
Arguments other than these are passed on to each main(argv) (e.g. --quick).
"""
import argparse
import importlib
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))


def discover() -> list:
    return sorted(f[:-3] for f in os.listdir(HERE) if f.startswith("bench_") and f.endswith(".py"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes and few repetitions")
    p.add_argument("--only", nargs="+", default=None, help="module names (bench_x or x) to run")
    p.add_argument("--list", action="store_true", help="list the benchmark modules and exit")
    args, rest = p.parse_known_args(argv)
    names = discover()
    if args.only:
        want = {n if n.startswith("bench_") else f"bench_{n}" for n in args.only}
        unknown = want - set(names)
        if unknown:
            p.error(f"no such benchmark module(s): {sorted(unknown)}; have {names}")
        names = [n for n in names if n in want]
    if args.list:
        print("\n".join(names))
        return 0
    sub_argv = (["--quick"] if args.quick else []) + rest
    summary = []
    for name in names:
        t0 = time.perf_counter()
        print(f"=== {name} {' '.join(sub_argv)}", flush=True)
        try:
            mod = importlib.import_module(f"bench.{name}")
            if not callable(getattr(mod, "main", None)):
                raise AttributeError(f"bench/{name}.py has no main(argv)")
            rc = mod.main(sub_argv)
            status = "ok" if rc in (None, 0) else f"exit {rc}"
        except SystemExit as e:
            status = "ok" if e.code in (None, 0) else f"exit {e.code}"
        except Exception as e:  # keep going: one broken benchmark must not hide the others
            traceback.print_exc()
            status = f"FAILED: {type(e).__name__}: {e}"
        summary.append((name, status, time.perf_counter() - t0))
    print("\n=== summary")
    for name, status, secs in summary:
        print(f"{name:32s} {secs:8.1f} s  {status}")
    failed = [n for n, s, _ in summary if s != "ok"]
    print(f"{len(summary) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
