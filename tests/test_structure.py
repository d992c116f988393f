"""The package's structure: folders layered (sine/, fold/ below conversion/, measure/), reached through
their public names, no import cycles, no module over 500 lines, its own modules imported at the top
of each file (the Triton side alone is loaded lazily), the custom operator registered on `import detr_fast`
without the kernels, and forward hooks on a Joiner's modules firing as in the reference."""
import ast
import pathlib
import subprocess
import sys

import torch

import detr_fast
from tests.upstream_reference import DEFORMABLE_LAYERS, upstream_joiner, upstream_pad

PACKAGE = pathlib.Path(detr_fast.__file__).parent
# The kernels import Triton: loaded on first use.
LAZY = {("sine/custom_op.py", "detr_fast.kernels.sine_embedding")}
FOLDERS = ("sine", "fold", "conversion", "measure", "kernels")
# The drop-in API at the top, built on sine/ and fold/; the utilities everything may use.
API_MODULES = ("backbone", "joiner", "detr", "dino", "resnet")
UTILITIES = ("dispatch", "validation", "nested_tensor")
# What each folder may import from the others (and the top-level modules it may use).
ALLOWED = {
    "sine": {"kernels", *UTILITIES},
    "fold": {*UTILITIES},
    "conversion": {"sine", "fold", *API_MODULES, *UTILITIES},
    "measure": {"sine", "fold", "conversion", *API_MODULES, *UTILITIES},
}
MAX_LINES = 500


def _modules():
    """(dotted name under detr_fast, path) of every module of the package, __init__ files included."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        yield ".".join(parts), path


def _resolve(module: str, path: pathlib.Path, node: ast.ImportFrom):
    """The absolute names (under detr_fast) a relative import statement names: the module it
    imports from, and each imported name as a possible submodule."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    if node.level > 1:
        package = package[:len(package) - (node.level - 1)]
    base = package + (node.module.split(".") if node.module else [])
    return ".".join(base), [".".join(base + [alias.name]) for alias in node.names]


def _imports(module: str, path: pathlib.Path, top_level_only: bool):
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            yield node, *_resolve(module, path, node)


def test_no_function_local_imports_of_the_package_itself():
    found = []
    for module, path in _modules():
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and node.level >= 1:
                        target = "detr_fast." + _resolve(module, path, node)[0]
                        if (str(path.relative_to(PACKAGE)), target) not in LAZY:
                            found.append(f"{path.relative_to(PACKAGE)}:{fn.name}: {ast.unparse(node)}")
    assert not found, found


def test_the_package_imports_form_no_cycle():
    known = {module for module, _ in _modules()}
    graph = {}
    for module, path in _modules():
        deps = set()
        for _, source, names in _imports(module, path, top_level_only=True):
            deps |= {n for n in [source, *names] if n in known and n != module}
        graph[module] = deps
    visiting, done = set(), set()

    def visit(module, chain):
        if module in done:
            return
        assert module not in visiting, " -> ".join(chain + [module])
        visiting.add(module)
        for dep in graph.get(module, ()):
            visit(dep, chain + [module])
        visiting.discard(module)
        done.add(module)

    for module in graph:
        visit(module, [])


def test_folders_are_layered():
    """sine/ and fold/ know nothing of conversion/, measure/ or the drop-in modules; conversion/
    nothing of measure/. The top-level utilities are open to all."""
    wrong = []
    for module, path in _modules():
        folder = module.split(".")[0]
        if folder not in ALLOWED:
            continue
        for node, source, _ in _imports(module, path, top_level_only=False):
            target = source.split(".")[0] if source else ""
            if target and target != folder and target not in ALLOWED[folder]:
                wrong.append(f"{path.relative_to(PACKAGE)}: {ast.unparse(node)}")
    assert not wrong, wrong


def test_other_folders_are_reached_through_their_public_names():
    """A module outside a folder imports what that folder's __init__ exports, not its modules."""
    wrong = []
    for module, path in _modules():
        own = module.split(".")[0]
        for node, source, _ in _imports(module, path, top_level_only=False):
            parts = source.split(".")
            if parts[0] in FOLDERS and parts[0] != "kernels" and parts[0] != own and len(parts) > 1:
                wrong.append(f"{path.relative_to(PACKAGE)}: {ast.unparse(node)}")
    assert not wrong, wrong


def test_each_folder_says_what_it_is_for():
    for folder in FOLDERS:
        init = PACKAGE / folder / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and doc.splitlines()[0].strip(), f"{folder}/__init__.py needs a one-line docstring"


def test_no_module_over_500_lines():
    root = PACKAGE.parent  # the repository: detr_fast/ and the kernels' own folder
    paths = [*PACKAGE.rglob("*.py"), *(root / "kernels").glob("*.py")]
    long = {str(path.relative_to(root)): n for path in paths if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_import_registers_the_operator_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"  # Triton unimportable
            "import torch, detr_fast\n"
            "assert hasattr(torch.ops.detr_fast, 'sine_masks_pos')\n"
            "assert 'detr_fast.kernels' not in sys.modules and 'detr_fast.kernels.sine_embedding' not in sys.modules\n"
            "print('registered')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "registered" in result.stdout, result.stderr[-2000:]


def _hooked(joiner):
    calls = []
    joiner[0].register_forward_hook(lambda m, args, out: calls.append(("backbone", len(out))))
    joiner[1].register_forward_hook(lambda m, args, out: calls.append(("pos", tuple(out.shape[-2:]))))
    return calls


def test_forward_hooks_fire_as_in_the_reference():
    reference = upstream_joiner("resnet18", DEFORMABLE_LAYERS, seed=2).eval()
    converted = detr_fast.convert(upstream_joiner("resnet18", DEFORMABLE_LAYERS, seed=2).eval())
    images = [torch.randn(3, 64, 96), torch.randn(3, 50, 80)]
    want, got = _hooked(reference), _hooked(converted)
    with torch.no_grad():
        reference(upstream_pad(images))
        converted(detr_fast.nested_tensor_from_tensor_list(images))
    assert got == want and len(want) == 4  # the backbone once, the embedding once per level


def test_a_hook_replacing_the_backbone_output_is_honoured():
    """The Joiner's fused masks/pos step must not hand the embedding a pos computed for masks a hook
    replaced: the embedding computes pos for the masks it is given."""
    reference = upstream_joiner("resnet18", DEFORMABLE_LAYERS, seed=3).eval()
    converted = detr_fast.convert(upstream_joiner("resnet18", DEFORMABLE_LAYERS, seed=3).eval())

    def drop_last_column(module, args, out):
        for level in out.values():
            level.mask = level.mask.clone()
            level.mask[:, :, -1] = True
        return out
    for joiner in (reference, converted):
        joiner[0].register_forward_hook(drop_last_column)
    images = [torch.randn(3, 64, 96), torch.randn(3, 50, 80)]
    with torch.no_grad():
        _, want = reference(upstream_pad(images))
        _, got = converted(detr_fast.nested_tensor_from_tensor_list(images))
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= 1e-5


_NEEDS_TRANSFORMERS = ('importorskip("transformers"', "hf_models", "build_realtime", "model_zoo.build")


def _marked_transformers(node: ast.AST) -> bool:
    return "pytest.mark.transformers" in ast.unparse(node)


def test_tests_that_need_transformers_are_marked():
    """CI runs `pytest -m transformers` under the declared floor of transformers: every test that
    needs transformers carries the marker (its module's pytestmark or its own decorator)."""
    unmarked = []
    here = pathlib.Path(__file__)
    for path in sorted(p for p in here.parent.rglob("test_*.py") if p.name != here.name):
        tree = ast.parse(path.read_text())
        module_marked = any(isinstance(n, ast.Assign) and [getattr(t, "id", None) for t in n.targets] == ["pytestmark"]
                            and _marked_transformers(n.value) for n in tree.body)
        if module_marked:
            continue
        top_level = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        if any(s in ast.unparse(n) for n in top_level for s in _NEEDS_TRANSFORMERS):
            unmarked.append(path.name)  # imported at the top: the whole module needs transformers
        for fn in tree.body:
            if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_") \
                    and any(s in ast.unparse(fn) for s in _NEEDS_TRANSFORMERS) \
                    and not any(_marked_transformers(d) for d in fn.decorator_list):
                unmarked.append(f"{path.name}::{fn.name}")
    assert not unmarked, unmarked
