"""Bad files never give a traceback: every command's every file option is fed a missing, empty, truncated,
random-bytes, wrong-format and non-UTF-8 file and must exit 2 with one line naming the option and the file,
before any model is loaded, leaving the file as it was. The table comes from the argparse parser itself."""
import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from xlkernels import cli, models
from xlkernels.analysis.steering.plan import SteeringPlan
from xlkernels.commands._files import CHECKS, describe, file_actions
from xlkernels.files import FileError, atomic_path, staged_dir

# every file-taking option, by hand: a new one must be added here (and declared with file_option)
EXPECTED = {
    "heads": {"--model": "model", "--corpus": "corpus", "--texts": "texts", "--scores": "scores",
              "--train-mask": "pairs", "--out": "out-dir"},
    "neurons": {"--model": "model", "--corpus": "corpus", "--texts": "texts", "--out": "out-dir"},
    "shift": {"--model": "model", "--corpus": "corpus", "--texts": "texts", "--importance": "scores",
              "--out": "out-dir"},
    "steer": {"--model": "model", "--plan": "plan", "--out": "out-dir"},
    "align": {"--model": "model", "--corpus": "corpus", "--texts": "texts", "--json": "out-file",
              "--plot": "out-file"},
    "eval": {"--model": "model", "--plan": "named-plan", "--corpus": "corpus", "--texts": "texts",
             "--out": "out-dir"},
    "reproduce": {"--model": "model", "--corpus": "corpus", "--texts": "texts", "--out": "out-dir"},
    "demo": {"--model": "model", "--out": "out-dir"},
    "info": {},
}
CASES = ("missing", "empty", "truncated", "random", "wrong-format", "non-utf8")
CORPUS = "".join(json.dumps({"text": t, "lang": x}) + "\n" for t, x in
                 (("Hello world, how are you?", "en"), ("Hallo Welt, wie geht es dir?", "de")) * 3)
PAIRS = "".join(json.dumps({"prompt": "The capital of France is", "answer": " Paris"}) + "\n" for _ in range(3))
FILEISH = re.compile(r"\b(FILE|PATH|DIR|file|directory)\b")


def subparsers():
    parser = cli.build_parser()
    return parser._subparsers._group_actions[0].choices


def looks_like_file(action):
    """The parser's own marks of a file option: metavar or help naming a file, a path-like dest."""
    if not action.option_strings or action.nargs == 0 or action.choices:
        return False
    text = f"{action.metavar or ''} {action.help or ''}"
    return bool(FILEISH.search(text)) or action.dest in ("out", "json", "plot", "plan", "corpus", "texts")


def test_table_matches_parser():
    found = {cmd: {a.option_strings[0]: a.file_kind for a in file_actions(p)} for cmd, p in subparsers().items()}
    assert found == EXPECTED
    for cmd, p in subparsers().items():   # nothing that looks like a file escapes the declaration
        loose = [a.option_strings[0] for a in p._actions if looks_like_file(a) and not getattr(a, "file_kind", None)]
        assert not loose, f"{cmd}: {loose} take files but are not declared with file_option"
    assert {k for v in EXPECTED.values() for k in v.values()} == set(CHECKS)


# ---- the files -----------------------------------------------------------------------------------------
def _plan_bytes(d):
    return SteeringPlan(gate=torch.ones(2, 4)).save(d / "good_plan.safetensors").read_bytes()


def _scores_bytes(d):
    save_file({"scores.en": torch.rand(2, 4)}, str(d / "s.safetensors"),
              metadata={"languages": '["en"]', "mode": "gradient"})
    return (d / "s.safetensors").read_bytes()


def _gguf_bytes(d):
    try:
        import gguf
    except ImportError:   # the bare header: magic, version 3, no tensors, no keys
        return b"GGUF" + (3).to_bytes(4, "little") + bytes(16)
    w = gguf.GGUFWriter(str(d / "m.gguf"), "llama")
    w.add_block_count(2)
    w.add_tensor("x", np.ones((32, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return (d / "m.gguf").read_bytes()


def _bad_header(data, old, new):
    """A safetensors file whose JSON header holds non-UTF-8 bytes (same length, so only the decoding fails)."""
    assert len(old) == len(new) and old in data[:8 + int.from_bytes(data[:8], "little")]
    return data.replace(old, new, 1)


def make_file(kind, case, d):
    """(argument value, path that must name the file in the error, path whose bytes must survive or None)."""
    d.mkdir(exist_ok=True)
    plan = _plan_bytes(d)
    text_ext, good, wrong = {
        "corpus": (".jsonl", CORPUS.encode(), ("plan.safetensors", plan)),
        "texts": (".jsonl", CORPUS.encode(), ("plan.safetensors", plan)),
        "pairs": (".jsonl", PAIRS.encode(), ("corpus.jsonl", CORPUS.encode())),
        "plan": (".safetensors", plan, ("corpus.jsonl", CORPUS.encode())),
        "named-plan": (".safetensors", plan, ("corpus.jsonl", CORPUS.encode())),
        "scores": (".safetensors", _scores_bytes(d), ("plan.safetensors", plan)),
        "model": (".gguf", _gguf_bytes(d) if kind == "model" else b"", ("plan.safetensors", plan)),
        "out-dir": ("", CORPUS.encode(), ("plan.safetensors", plan)),
        "out-file": (".json", CORPUS.encode(), ("plan.safetensors", plan)),
    }[kind]
    path = d / f"bad_{case}{text_ext}"
    if case == "missing":
        if kind.startswith("out-"):   # a missing output is fine; one under a file is not
            (d / "afile").write_bytes(b"x")
            path = d / "afile" / "out.json"
        value = str(path)
    else:
        if case == "empty":
            data = b""
        elif case == "truncated":
            data = good[:len(good) // 2 + 3]
        elif case == "random":
            data = np.random.default_rng(7).bytes(512)
        elif case == "wrong-format":
            path, data = d / wrong[0], wrong[1]
        elif text_ext == ".safetensors":
            data = _bad_header(good, b'"F32"', b'"\xff\xfe\xfd"')
        elif kind == "model":   # a model directory whose config.json is not UTF-8
            path = d / "model_dir"
            path.mkdir()
            (path / "config.json").write_bytes(b'{"model_type": "ll\xffama"}\n')
            data = None
        else:
            first = good.index(b"\n") + 4
            data = good[:first] + b"\xe4" + good[first:]   # latin-1 in line 2, not UTF-8
        if data is not None:
            path.write_bytes(data)
        value = str(path)
    if kind in ("texts", "named-plan"):
        value = f"de={path}"
    keep = path if path.is_file() else None
    return value, str(path), keep


BASE = {"steer": ["--prompt", "x"]}


@pytest.fixture
def no_model(monkeypatch, tmp_path):
    """Loading any model fails the test; the cwd (default outputs) is a fresh directory."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the files were checked")
    for name in ("load_default", "load_model", "tiny_model"):
        monkeypatch.setattr(models, name, boom)
    monkeypatch.chdir(tmp_path)


def fuzz_table():
    return [(cmd, a.option_strings[0], a.file_kind, case) for cmd, p in subparsers().items()
            for a in file_actions(p) for case in CASES]


def test_fuzz_table_size():
    table = fuzz_table()
    assert len(table) == sum(len(v) for v in EXPECTED.values()) * len(CASES) == 34 * 6


@pytest.mark.parametrize("cmd,option,kind,case", fuzz_table())
def test_bad_file(cmd, option, kind, case, tmp_path, capsys, no_model):
    value, named, keep = make_file(kind, case, tmp_path / "f")
    before = keep.read_bytes() if keep else None
    argv = [cmd, *BASE.get(cmd, [])]
    if cmd == "steer" and option != "--plan":
        argv += ["--plan", str(tmp_path / "f" / "good_plan.safetensors")]
    rc = cli.main(argv + [option, value])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"xlkernels {cmd}: error: {option} "), err
    assert named in lines[0] and "Traceback" not in err and not out.strip(), err
    if keep is not None:
        assert keep.read_bytes() == before   # nothing the user saved is touched


def test_out_file_needs_force_and_is_never_a_directory(tmp_path, capsys, no_model):
    (tmp_path / "r.json").write_text("mine")
    assert cli.main(["align", "--json", str(tmp_path), "--no-plot"]) == 2
    assert "--json" in capsys.readouterr().err
    with pytest.raises(AssertionError, match="model was loaded"):   # --force: past the checks, to the model
        cli.main(["align", "--json", str(tmp_path / "r.json"), "--no-plot", "--force", "--debug"])
    assert (tmp_path / "r.json").read_text() == "mine"
    (tmp_path / "align.png").write_text("mine")   # --no-plot: the existing default plot is not in the way
    (tmp_path / "align.json").unlink(missing_ok=True)
    with pytest.raises(AssertionError, match="model was loaded"):
        cli.main(["align", "--no-plot", "--debug"])


def test_bad_spec_and_later_errors_name_the_option(tmp_path, capsys, no_model):
    assert cli.main(["neurons", "--texts", "de"]) == 2
    assert capsys.readouterr().err.strip() == "xlkernels neurons: error: --texts de: expected LANG=FILE"
    # an error raised inside the command (after the checks) is traced back to its option by the path
    p = cli.build_parser()
    args = p.parse_args(["neurons", "--texts", f"de={tmp_path / 'de.txt'}"])
    e = FileError(tmp_path / "de.txt", "boom", line=3)
    assert describe(e, args._parser, args) == f"--texts de={tmp_path / 'de.txt'}:3: boom"


def test_non_utf8_names_file_and_line(tmp_path, capsys, no_model):
    f = tmp_path / "de.txt"
    f.write_bytes("eins\nzwei\n".encode() + b"dr\xe9i\n")
    assert cli.main(["heads", "--texts", f"de={f}"]) == 2
    assert capsys.readouterr().err.strip() == (f"xlkernels heads: error: --texts de={f}:3: not UTF-8 "
                                               "(byte 0xe9 at column 3)")


# ---- writes -----------------------------------------------------------------------------------------------
def test_staged_dir_keeps_old_files_on_failure(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "a.json").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dir(out) as d:
            (tmp_path / "o" / "x").mkdir()
            open(os.path.join(d, "a.json"), "w").write("half")
            raise RuntimeError("killed mid-write")
    assert (out / "a.json").read_text() == "old" and sorted(os.listdir(out)) == ["a.json", "x"]
    with staged_dir(out) as d:
        os.makedirs(os.path.join(d, "plans", "m"))
        open(os.path.join(d, "a.json"), "w").write("new")
        open(os.path.join(d, "plans", "m", "p"), "w").write("p")
    assert (out / "a.json").read_text() == "new" and (out / "plans" / "m" / "p").read_text() == "p"
    assert sorted(os.listdir(out)) == ["a.json", "plans", "x"]   # no staging directory left
    with pytest.raises(RuntimeError):
        with staged_dir(tmp_path / "new") as d:
            raise RuntimeError
    assert not (tmp_path / "new").exists()


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    f = tmp_path / "r.json"
    f.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(f) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError
    assert f.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]
    with atomic_path(f) as tmp:
        assert tmp.endswith(".json")
        open(tmp, "w").write("new")
    assert f.read_text() == "new" and os.listdir(tmp_path) == ["r.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert f.stat().st_mode & 0o777 == 0o666 & ~umask   # as open() makes it, not mkstemp's 0600
