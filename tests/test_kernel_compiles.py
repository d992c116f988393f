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
from detr_fast.kernels.sine_embedding import _sine_embedding_kernel as kernel, extent_constants

names = list(inspect.signature(kernel.fn).parameters)
pointers = {"pos_ptr": "*fp32", "mask_ptr": "*i8", "dim_t_ptr": "*fp32", "sizes_ptr": "*i64",
            "ycum_ptr": "*fp32", "xcum_ptr": "*fp32"}
floats = ("scale_h", "scale_w", "offset", "eps", "scale")
# (RECT, NORMALIZE, BLOCK_H, BLOCK_W, BLOCK_C, out dtype): the launcher's block choices on CUDA,
# square and non-square tiles, one channel block of 2 and of 64.
# The last item is the level's longer side: rectangular levels count their extents in one pass
# (100) or, past 1024 rows or columns, in several (1333); the extent constants are the launcher's.
configs = [(True, True, 8, 16, 64, "*fp32", 100), (True, False, 1, 16, 2, "*bf16", 1333),
           (False, True, 8, 8, 64, "*fp32", 100), (False, False, 8, 1, 64, "*fp16", 1333)]
for rect, normalize, bh, bw, bc, out, side in configs:
    extent_block, extent_iters = extent_constants(side, side, rect)
    const = dict(RECT=rect, NORMALIZE=normalize, WRITE_MASK=rect, BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc,
                 EXTENT_BLOCK=extent_block, EXTENT_ITERS=extent_iters)
    sig = {n: "constexpr" if n in const else ("fp32" if n in floats else pointers.get(n, "i32")) for n in names}
    sig["pos_ptr"] = out
    src = ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in const.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    assert compiled.asm.get("cubin"), (rect, normalize)
print("compiled", len(configs))
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
    assert "compiled 4" in result.stdout
