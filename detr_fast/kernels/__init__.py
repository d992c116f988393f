"""Triton kernels and their launchers: tensors in, tensors out.

Their source is the repository's top-level kernels/ folder. That folder has no __init__.py, so it is
never a top-level package `kernels` (Hugging Face's distribution of that name, imported by
transformers >= 5.25, owns it; a namespace folder never wins over an installed package). A wheel
copies the files next to this one (setup.py); in a source checkout (an editable install, or the
repository's root on sys.path) the folder joins this package's __path__ here.
"""
import os as _os

_ROOT = _os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
_SOURCE = _os.path.join(_ROOT, "kernels")
# pyproject.toml beside kernels/ marks a checkout: in site-packages, a `kernels` folder there is
# Hugging Face's distribution, which must not join our path.
if _os.path.isfile(_os.path.join(_ROOT, "pyproject.toml")) and _os.path.isdir(_SOURCE):
    __path__.append(_SOURCE)
