"""File-taking options: each is declared with file_option(..., kind=...), and check_files reads every file
given (with the library's own loaders) before the command loads a model, so a bad file fails at once."""
import os

from xlkernels.files import FileError, check_output


def file_option(group, *flags, kind, **kw):
    """group.add_argument(*flags, **kw), marked as taking a file of `kind` (a key of CHECKS)."""
    if kind not in CHECKS:
        raise ValueError(f"unknown file kind {kind!r}")
    action = group.add_argument(*flags, **kw)
    action.file_kind = kind
    return action


def split_spec(spec, form):
    """'KEY=PATH' -> (KEY, expanded PATH); FileError naming the spec otherwise."""
    key, sep, path = spec.partition("=")
    if not sep or not key or not path:
        raise FileError(spec, f"expected {form}")
    return key, os.path.expanduser(path)


def _model(value, args):
    from xlkernels.models.local import resolve_path
    resolve_path(value)


def _corpus(value, args):
    from ._common import load_corpus_file
    load_corpus_file(value)


def _texts(value, args):
    from xlkernels.analysis.data import load_texts
    lang, path = split_spec(value, "LANG=FILE")
    load_texts(path, lang=lang)


def _plan(value, args):
    from xlkernels.analysis.steering.plan import SteeringPlan
    SteeringPlan.load(os.path.expanduser(value))


def _named_plan(value, args):
    from xlkernels.analysis.neurons.forcing import load_plan
    load_plan(split_spec(value, "NAME=PATH")[1])


def _scores(value, args):
    from .heads import load_scores
    load_scores(value)


def _pairs(value, args):
    from .heads import read_pairs
    read_pairs(value)


def _out_dir(value, args):
    check_output(os.path.expanduser(value), "dir")


def _out_file(value, args):
    check_output(os.path.expanduser(value), "file", force=getattr(args, "force", False))


SPECS = ("texts", "named-plan")   # kinds whose value is KEY=PATH
CHECKS = {"model": _model, "corpus": _corpus, "texts": _texts, "plan": _plan, "named-plan": _named_plan,
          "scores": _scores, "pairs": _pairs, "out-dir": _out_dir, "out-file": _out_file}


def file_actions(parser):
    return [a for a in parser._actions if getattr(a, "file_kind", None)]


def _values(args, action):
    v = getattr(args, action.dest, None)
    if v is None or getattr(args, f"no_{action.dest}", False):   # e.g. --no-plot: --plot is not written
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


def check_files(parser, args):
    """Read every file given to `parser`'s file options; a bad one raises FileError with .option and .arg."""
    for action in file_actions(parser):
        for value in _values(args, action):
            try:
                CHECKS[action.file_kind](value, args)
            except FileError as e:
                e.option, e.arg, e.spec = action.option_strings[0], value, action.file_kind in SPECS
                raise


def describe(e, parser, args):
    """'OPTION ARG...: reason' for a FileError: the option from check_files, or the one whose value names
    e.path (an error raised later, inside the command); just str(e) when none does."""
    option, arg = getattr(e, "option", None), getattr(e, "arg", None)
    if option is None:
        for action in file_actions(parser):
            spec = action.file_kind in SPECS
            for value in _values(args, action):
                path = os.path.expanduser(value.partition("=")[2] if spec else value)
                if e.path == path or e.path.startswith(path.rstrip(os.sep) + os.sep):
                    option, arg = action.option_strings[0], value
                    e.spec = spec
    if option is None:
        return str(e)
    key = arg.partition("=")[0] + "=" if getattr(e, "spec", False) and e.path != arg else ""
    return f"{option} {key}{e}"
