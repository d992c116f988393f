"""The package's structure: no import cycles, its own modules imported at the top of each file
(the Triton side alone is loaded lazily), the custom operator registered on `import detr_fast`
without the kernels, and forward hooks on a Joiner's modules firing as in the reference."""
import ast
import pathlib
import subprocess
import sys

import torch

import detr_fast
from tests.upstream_reference import DEFORMABLE_LAYERS, upstream_joiner, upstream_pad

PACKAGE = pathlib.Path(detr_fast.__file__).parent
LAZY = {("ops.py", ".kernels.sine_embedding")}  # the kernels import Triton: loaded on first use


def _own_imports(node: ast.AST):
    """The detr_fast modules an import statement names (relative imports)."""
    if isinstance(node, ast.ImportFrom) and node.level == 1:
        if node.module:
            return [node.module.split(".")[0]]
        return [alias.name for alias in node.names]
    return []


def test_no_function_local_imports_of_the_package_itself():
    found = []
    for path in sorted(PACKAGE.glob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and node.level >= 1 \
                            and (path.name, "." + (node.module or "")) not in LAZY:
                        found.append(f"{path.name}:{fn.name}: {ast.unparse(node)}")
    assert not found, found


def test_the_package_imports_form_no_cycle():
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        module = path.stem
        tree = ast.parse(path.read_text())
        top_level = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
        graph[module] = {m for n in top_level for m in _own_imports(n) if m != "kernels"}
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
    for path in sorted(p for p in here.parent.glob("test_*.py") if p.name != here.name):
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
