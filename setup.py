"""Packaging for detr_fast.

The Triton kernels live in the top-level ``kernels/`` folder of the repository but are
installed as ``detr_fast.kernels``: the bare import name ``kernels`` belongs to Hugging Face's
distribution (transformers >= 5.25 imports it), so kernels/ has no ``__init__.py`` and is never a
package of its own. The package ``detr_fast.kernels`` is ``detr_fast/kernels/__init__.py``; a wheel
gets the kernels' files copied next to it (below), and a checkout finds them through its __path__.
(setuptools' editable installs cannot map a folder without ``__init__.py`` into a regular package,
hence the copy rather than a package_dir mapping.)
"""
import glob
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPyWithKernels(build_py):
    """build_py, plus kernels/*.py copied into detr_fast/kernels/ of the build."""

    def run(self) -> None:
        super().run()
        target = os.path.join(self.build_lib, "detr_fast", "kernels")
        self.mkpath(target)
        for source in sorted(glob.glob(os.path.join("kernels", "*.py"))):
            self.copy_file(source, os.path.join(target, os.path.basename(source)))


# transformers' floor is detr_fast.conversion.transformers.TRANSFORMERS_FLOOR (convert() leaves the stages of an
# older release alone); tests/test_packaging.py checks that this line says the same, and CI tests that release.
HF = ["transformers>=5.17.0", "timm>=1.0"]
ONNX = ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.2"]

setup(
    name="detr_fast",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for the backbone stage of DETR-family detectors",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # Every package under detr_fast/ (sine, fold, conversion, measure, kernels, ...), found rather than listed.
    packages=find_packages(include=["detr_fast", "detr_fast.*"]),
    cmdclass={"build_py": BuildPyWithKernels},
    install_requires=["torch>=2.1", "torchvision>=0.16", "triton>=2.1"],
    extras_require={
        # transformers' DETR family (convert() of DetrForObjectDetection & co.) and its timm backbones.
        "hf": HF,
        # ONNX export checks and the onnxruntime peer of the CPU benchmarks (dynamo=True needs onnxscript).
        "onnx": ONNX,
        "test": ["pytest>=7", "pytest-benchmark>=4", "numpy", "ruff>=0.5"] + HF + ONNX,
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["detr-fast=detr_fast.__main__:main"]},
)
