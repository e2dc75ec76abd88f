"""Static SASS instruction counts of the scale-search kernels, compiled for sm_90a without a GPU.

Triton compiles a kernel for a target it is told about (``GPUTarget("cuda", 90, 32)``) with the ``ptxas``
it ships, and ships ``nvdisasm`` too, so the machine code a Hopper GPU would run can be counted on any
machine. The search kernels are unrolled over their candidates, so a path's static count is about what
each thread issues (it also counts the rarely taken slow path of the per-block IEEE divisions):
instructions per element = count / elements per thread. A count is not a time (latency,
occupancy and memory are left out); the GPU benchmark (``search.py``) measures those.

    python benchmarks/sass_counts.py            # NVFP4 block 16 and MXFP4 block 32, fp16 weights
"""

from __future__ import annotations

import collections
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from quantize_cli.kernels import scale_search
from quantize_cli.kernels.constants import E2M1_EMAX, E8M0_BIAS, F4_E2M1_MAX, F8_E4M3_MAX
from quantize_cli.kernels.triton import search

TARGET = GPUTarget("cuda", 90, 32)
ALIGNED = ("x_ptr", "h_ptr", "gs_ptr", "tab_ptr", "q_ptr", "scale_ptr", "cols")  # as the launcher specializes them
_OPCODE = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")


def sass_opcodes(fn, signature: dict[str, str], constexprs: dict, num_warps: int, **options) -> collections.Counter:
    """Opcode counts of ``fn`` compiled for sm_90a (pointer arguments and ``cols`` 16-aligned)."""
    signature = signature | {k: "constexpr" for k in constexprs}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in ALIGNED if a in signature}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=TARGET, options=dict(num_warps=num_warps, **options))
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout
    return collections.Counter(m.group(1) for line in text.splitlines() if (m := _OPCODE.match(line)))


def _formats(nvfp4: bool) -> dict:
    steps = scale_search.NVFP4_STEPS if nvfp4 else scale_search.MXFP4_STEPS
    return dict(
        NVFP4=nvfp4, STEP0=steps[0], NSTEPS=len(steps), EMAX=F4_E2M1_MAX if nvfp4 else E2M1_EMAX,
        FMAX=F8_E4M3_MAX, BIAS=E8M0_BIAS, TAB=256,
    )  # fmt: skip


def sse_counts(block: int, nvfp4: bool, dtype: str = "fp16") -> tuple[collections.Counter, int]:
    """(opcodes, elements per thread) of the SSE kernel's clamped path (SKIP_CLAMP off: one path)."""
    bb, nch, w = search._tiling(block)
    sig = {"x_ptr": f"*{dtype}", "gs_ptr": "*fp32", "tab_ptr": "*fp32", "q_ptr": "*u8", "scale_ptr": "*u8"}
    sig |= {"rows": "i32", "cols": "i32"}
    ce = dict(BLOCK=block, BB=bb, NCH=nch, W=w, LOG_NCH=nch.bit_length() - 1, FUSE=dtype != "fp32", SKIP_CLAMP=False)
    ops = sass_opcodes(search._search_kernel, sig, ce | _formats(nvfp4), search.SEARCH_WARPS, enable_fp_fusion=False)
    return ops, bb * nch * w // (32 * search.SEARCH_WARPS)


def hessian_counts(block: int, nvfp4: bool, dtype: str = "fp16") -> tuple[collections.Counter, int]:
    """(opcodes, elements per thread) of the Hessian kernel."""
    bp = max(16, triton.next_power_of_2(block))
    sig = {"x_ptr": f"*{dtype}", "h_ptr": "*fp32", "gs_ptr": "*fp32", "tab_ptr": "*fp32", "q_ptr": "*u8"}
    sig |= {"scale_ptr": "*u8", "rows": "i32", "cols": "i32"}
    ce = dict(BLOCK=block, BB=search.HESSIAN_ROWS, BP=bp, SPLIT_X=dtype == "fp32", EMULATE=False)
    ops = sass_opcodes(search._hessian_kernel, sig, ce | _formats(nvfp4), search.HESSIAN_WARPS)
    return ops, search.HESSIAN_ROWS * bp // (32 * search.HESSIAN_WARPS)


def main() -> None:
    print("| kernel | format | instructions / thread | elements / thread | per element | per element and candidate |")
    print("|---|---|---|---|---|---|")
    for name, counts in (("SSE", sse_counts), ("Hessian", hessian_counts)):
        for fmt, block, nvfp4 in (("nvfp4 b16", 16, True), ("mxfp4 b32", 32, False)):
            ops, per_thread = counts(block, nvfp4)
            total = sum(ops.values())
            per_element = total / per_thread
            steps = _formats(nvfp4)["NSTEPS"]
            print(f"| {name} | {fmt} | {total} | {per_thread} | {per_element:.1f} | {per_element / steps:.1f} |")


if __name__ == "__main__":
    main()
