"""The Triton kernels compile for a real GPU target, without a GPU.

The interpreter (TRITON_INTERPRET=1, how the rest of the suite runs the kernels on CPU) executes
the kernel body as Python and never applies Triton's compiler rules (e.g. a variable assigned in
both branches of a runtime `if` must keep one type). A kernel can pass every interpreted test and
still fail to compile on CUDA, so here Triton compiles it ahead of time for sm_90 down to a cubin.
That needs no GPU, only Triton's bundled ptxas, and runs in a subprocess because Triton decides at
decoration time whether it is interpreting.
"""
import os
import subprocess
import sys

import pytest

CHECK = r'''
import inspect
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from detr_fast.kernels.sine_embedding import (_sine_general_kernel, _sine_rect_kernel, choose_tiles,
                                              extent_constants)

pointers = {"pos_ptr": "*fp32", "mask_ptr": "*i8", "dim_t_ptr": "*fp32", "dim_t_x_ptr": "*fp32", "sizes_ptr": "*i64",
            "ycum_ptr": "*fp32", "xcum_ptr": "*fp32"}
floats = ("scale_h", "scale_w", "offset", "eps", "scale")


def compile_kernel(kernel, const, out):
    names = list(inspect.signature(kernel.fn).parameters)
    types = {n: "fp32" if n in floats else pointers.get(n, "i32") for n in names if n not in const}
    types["pos_ptr"] = out
    if "constexprs" in inspect.signature(ASTSource).parameters:  # Triton >= 3.3
        sig = {n: "constexpr" if n in const else types[n] for n in names}
        src = ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in const.items()})
    else:  # Triton 3.0-3.2 (the GPU machines' may be that old): constexprs by name, out of the signature
        src = ASTSource(kernel, types, constants=dict(const))
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    assert compiled.asm.get("cubin"), const


# The launcher's own GPU tiles (choose_tiles) for square and non-square levels, one channel block
# of 2 and of 64, each output dtype. The rect kernel's extent constants are the launcher's too:
# one counting pass for a 100-pixel side, several past 1024 (1333).
configs = [(True, 100, 128, "*fp32"), (False, 1333, 2, "*bf16"), (True, 1333, 64, "*fp16")]
n = 0
for normalize, side, feats, out in configs:
    rect_tiles = choose_tiles(side, side, feats, True, for_gpu=True)
    extent_block, extent_iters = extent_constants(side, side)
    compile_kernel(_sine_rect_kernel, dict(NORMALIZE=normalize, BLOCK_H=rect_tiles.block_h,
                                           BLOCK_W=rect_tiles.block_w, BLOCK_C=rect_tiles.block_c,
                                           EXTENT_BLOCK=extent_block, EXTENT_ITERS=extent_iters), out)
    general_tiles = choose_tiles(side, side, feats, False, for_gpu=True)
    compile_kernel(_sine_general_kernel, dict(NORMALIZE=normalize, BLOCK_H=general_tiles.block_h,
                                              BLOCK_W=general_tiles.block_w, BLOCK_C=general_tiles.block_c), out)
    n += 2
print("compiled", n)
'''


def test_sine_kernel_compiles_for_sm90():
    pytest.importorskip("triton.compiler", reason="needs Triton's compiler")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no ASTSource/GPUTarget ahead-of-time API")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled 6" in result.stdout
