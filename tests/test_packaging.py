"""Packaging: kernels/ installs as detr_fast.kernels and never as a top-level `kernels`; the CLI runs;
setup.py declares the transformers floor that convert() knows.

The subprocesses run with their working directory outside the repository, so that the current
directory on sys.path cannot make the repository's folders importable by accident: what they see
is what an installed detr_fast provides.
"""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args, cwd, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120, **kwargs)


def test_detr_fast_kernels_is_the_repository_kernels_folder():
    import detr_fast.kernels.sine_embedding

    assert Path(detr_fast.kernels.sine_embedding.__file__).resolve().parent == REPO / "kernels"


def test_top_level_kernels_is_not_ours(tmp_path):
    # Only find_spec: importing nothing keeps this subprocess fast (no torch import).
    code = (
        "import importlib.util, json\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "locations = [] if spec is None else [spec.origin or ''] + list(spec.submodule_search_locations or [])\n"
        "print(json.dumps(locations))\n"
    )
    result = _run(["-c", code], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ours = REPO / "kernels"
    for location in json.loads(result.stdout):
        if location:
            path = Path(location).resolve()
            assert path != ours and ours not in path.parents, f"top-level 'kernels' resolves to {path}"


def test_build_puts_kernels_under_detr_fast_only(tmp_path):
    # build_py lays out the files exactly as a wheel would install them (and writes only to tmp_path).
    result = _run(["setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=REPO)
    assert result.returncode == 0, result.stderr
    # Every module of the package is in the build (an explicit package list once left folders out).
    for source in (REPO / "detr_fast").rglob("*.py"):
        assert (tmp_path / source.relative_to(REPO)).is_file(), source.relative_to(REPO)
    assert (tmp_path / "detr_fast" / "kernels" / "__init__.py").is_file()
    assert not (tmp_path / "kernels").exists()
    for source in (REPO / "kernels").glob("*.py"):
        assert (tmp_path / "detr_fast" / "kernels" / source.name).is_file(), source.name


def test_installed_kernels_wins_from_the_repository_root(tmp_path):
    # transformers >= 5.25 imports Hugging Face's `kernels` distribution. Started in the root (as
    # pytest, the README's examples and user scripts are), an interpreter has the root on sys.path
    # first; kernels/ has no __init__.py, so it is at most a namespace portion, and an installed
    # regular package of that name wins. The stand-in is a distribution: a package plus its metadata.
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("STAND_IN = True\n")
    (site / "kernels-0.0.1.dist-info").mkdir()
    (site / "kernels-0.0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.0.1\n")
    code = (
        "import importlib.metadata, kernels\n"
        "print(kernels.STAND_IN, importlib.metadata.version('kernels'), kernels.__file__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    for cwd in (REPO, REPO / "tests"):
        result = _run(["-c", code], cwd=cwd, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("True 0.0.1 "), result.stdout
        assert Path(result.stdout.split()[-1]).resolve() == site / "kernels" / "__init__.py"


def test_repository_has_no_top_level_package_named_kernels():
    # The rule behind the test above, for every folder: none of the root's folders that hold Python
    # code may be a regular package except detr_fast (bench and tests are test-only packages).
    regular = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert regular <= {"detr_fast", "bench", "tests"}, regular


def test_cli_help(tmp_path):
    result = _run(["-m", "detr_fast", "--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "profile" in result.stdout


def test_cli_profile_help(tmp_path):
    result = _run(["-m", "detr_fast", "profile", "--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for flag in ("--device", "--batch", "--dtype", "--json"):
        assert flag in result.stdout, flag


@pytest.mark.parametrize("args", [[], ["frobnicate"]])
def test_cli_without_a_known_command_fails(args, capsys):
    # In-process (argparse exits with status 2): a third interpreter start would only cost time.
    from detr_fast.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert "usage" in capsys.readouterr().err.lower()


def _extras_list(name: str):
    """A list of requirements assigned to ``name`` at the top of setup.py (setup.py is not importable)."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [name]:
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py assigns no {name}")


def test_setup_declares_the_transformers_floor_convert_knows():
    from detr_fast.conversion.transformers import TRANSFORMERS_FLOOR
    requirements = [r.replace(" ", "") for r in _extras_list("HF") if r.startswith("transformers")]
    assert requirements == [f"transformers>={TRANSFORMERS_FLOOR}"]
    # CI's second run installs exactly that release, read from the same constant.
    assert "TRANSFORMERS_FLOOR" in (REPO / ".ci" / "run").read_text(encoding="utf-8")
