"""Layout of xlkernels.triton: its modules import each other as a DAG (no circle), and the attention kernels share
their @triton.jit helpers through attention_common instead of importing each other (issue 19 §3). Read from the
sources with ast (imports inside functions count too), so nothing is imported or compiled."""
import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "xlkernels", "triton")
MODULES = sorted(f[:-3] for f in os.listdir(PKG) if f.endswith(".py") and f != "__init__.py")


def _imports(name):
    """Sibling modules of xlkernels.triton that module `name` imports, anywhere in its source."""
    with open(os.path.join(PKG, name + ".py")) as f:
        tree = ast.parse(f.read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from . import x / from .x import y
                mods = [a.name for a in node.names] if node.module is None else [node.module.split(".")[0]]
            elif node.level == 0 and (node.module or "").startswith("xlkernels.triton"):
                rest = node.module.split(".")[2:]
                mods = rest[:1] if rest else [a.name for a in node.names]
            else:
                continue
        elif isinstance(node, ast.Import):
            mods = [a.name.split(".")[2] for a in node.names if a.name.startswith("xlkernels.triton.")]
        else:
            continue
        out.update(m for m in mods if m in MODULES and m != name)
    return out


def graph():
    return {m: _imports(m) for m in MODULES}


def find_cycle(g):
    """A list of modules forming an import circle (first = last), or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                c = visit(n)
                if c:
                    return c
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(g):
        if m not in state:
            c = visit(m)
            if c:
                return c
    return None


def test_find_cycle_sees_circles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_triton_package_imports_form_a_dag():
    g = graph()
    assert {"attention", "attention_common", "attention_bwd", "attention_decode", "attention_tma"} <= set(g)
    cycle = find_cycle(g)
    assert cycle is None, "import circle in xlkernels.triton: " + " -> ".join(cycle)


def test_attention_kernels_share_helpers_through_attention_common():
    """The forward dispatch (attention) may call decode and TMA; the kernels themselves depend only on
    attention_common (and grids), and attention_common on no attention module."""
    g = graph()
    att = {m for m in MODULES if m.startswith("attention")}
    assert g["attention_common"] & att == set()
    for m in ("attention_bwd", "attention_decode", "attention_tma"):
        assert g[m] & att == {"attention_common"}, (m, g[m])
    assert g["attention"] & att == {"attention_common", "attention_decode", "attention_tma"}
