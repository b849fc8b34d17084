"""Files users hand to xlkernels: one error type naming the file, checked readers, and writes that never
leave a truncated file behind (temp file in the same directory, then rename)."""
import contextlib
import io
import json
import os
import shutil
import tempfile


class FileError(ValueError):
    """A user's file is missing, unreadable or not what was expected. str(e) = 'PATH: reason' or
    'PATH:LINE: reason'; e.path, e.line and e.reason hold the parts."""

    def __init__(self, path, reason, line=None):
        self.path, self.reason, self.line = os.fspath(path), reason, line
        super().__init__(f"{self.path}{'' if line is None else f':{line}'}: {reason}")


class MissingFileError(FileError, FileNotFoundError):
    """The file (or directory) does not exist."""


def check_file(path, empty_ok=True):
    """Raise FileError unless `path` is a regular file (and, unless empty_ok, not empty)."""
    if not os.path.lexists(path):
        raise MissingFileError(path, "no such file or directory")
    if os.path.isdir(path):
        raise FileError(path, "is a directory, expected a file")
    if not os.path.isfile(path):
        raise FileError(path, "not a regular file")
    if not empty_ok and os.path.getsize(path) == 0:
        raise FileError(path, "empty file")


def read_bytes(path) -> bytes:
    check_file(path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise FileError(path, e.strerror or str(e)) from None


def read_text(path) -> str:
    """The file as UTF-8 text (a leading BOM dropped); binary or non-UTF-8 data raise FileError with the line."""
    data = read_bytes(path)
    nul = data.find(b"\x00")
    if nul >= 0:
        raise FileError(path, "binary data (a NUL byte), not text", line=data.count(b"\n", 0, nul) + 1)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - data.rfind(b"\n", 0, e.start)
        raise FileError(path, f"not UTF-8 (byte 0x{data[e.start]:02x} at column {col})", line=line) from None


def read_json(path):
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FileError(path, f"not valid JSON ({e.msg})", line=e.lineno) from None


def read_jsonl(path, text=None):
    """(line number, object) for each non-blank line of a JSONL file (or of `text` read from it); FileError at
    the first line that is not JSON."""
    for i, line in enumerate(io.StringIO(read_text(path) if text is None else text, newline=None), 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            raise FileError(path, f"not valid JSON ({e.msg})", line=i) from None


def read_safetensors(path, keys=None):
    """(metadata dict, {name: tensor}) of a safetensors file (all tensors, or those in `keys` that exist)."""
    check_file(path, empty_ok=False)
    from safetensors import safe_open
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            names = [k for k in f.keys() if keys is None or k in keys]
            return meta, {k: f.get_tensor(k) for k in names}
    except Exception as e:   # SafetensorError and friends: the file's bytes are at fault
        msg = str(e).removeprefix("Error while deserializing header: ")
        raise FileError(path, f"not a safetensors file, or truncated ({msg})") from None


def json_field(path, meta, key):
    """json.loads of the metadata entry `key` of a safetensors file, as FileError if it is not JSON."""
    try:
        return json.loads(meta[key])
    except (json.JSONDecodeError, TypeError) as e:
        raise FileError(path, f"metadata {key!r} is not valid JSON ({e})") from None


# ---- writing ----------------------------------------------------------------------------------------
def check_output(path, kind="dir", force=False):
    """Raise FileError unless `path` can be written as a directory (kind "dir": may exist as one) or a file
    (kind "file": must not exist unless force; never a directory)."""
    path = os.fspath(path)
    if kind == "dir" and os.path.lexists(path) and not os.path.isdir(path):
        raise FileError(path, "exists and is not a directory")
    if kind == "file" and os.path.isdir(path):
        raise FileError(path, "is a directory, expected a file name")
    if kind == "file" and os.path.lexists(path) and not force:
        raise FileError(path, "exists; pass --force to replace it")
    up = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(up):
        up = os.path.dirname(up)
    if not os.path.isdir(up):
        raise FileError(path, f"{up} is not a directory")
    if not os.access(up if not os.path.isdir(path) else path, os.W_OK | os.X_OK):
        raise FileError(path, "permission denied")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path beside `path` (same extension); on success it replaces `path`, on error it is removed."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{name}.", suffix=os.path.splitext(name)[1])
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)   # as open() would make it, not mkstemp's 0600
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def staged_dir(out):
    """Yield a fresh directory inside `out` to write into; on success its files replace those of the same
    names in `out` (one rename each, so no file is ever left half-written), on error it is removed."""
    out = os.fspath(out)
    made = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=out, prefix=".partial-")
    try:
        yield tmp
        for root, _, names in os.walk(tmp):
            dest = os.path.join(out, os.path.relpath(root, tmp))
            os.makedirs(dest, exist_ok=True)
            for name in names:
                target = os.path.join(dest, name)
                if os.path.isdir(target):
                    raise FileError(target, "is a directory; the output file of that name cannot replace it")
                os.replace(os.path.join(root, name), target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if made and not os.listdir(out):
            os.rmdir(out)
