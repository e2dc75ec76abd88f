"""Fused dequantize-matmul: ``y = x @ W.T (+ bias)`` with ``W`` still packed (a GEMV for a few input
rows, a GEMM on the tensor cores for many).

``W`` is (N, KP) codes, KP = in_features padded to whole blocks: 4-bit codes two per byte (first element
in the high nibble), (N, KP // 2) uint8, or 8-bit codes (N, KP) int8/uint8; ``scale`` is (N, KP // block)
fp32. A code decodes to ``lut[code]`` (a codebook, or fp8's byte -> value table) or to
``code - offset - zero_point[block]`` (int4: offset 8 when symmetric; int8: signed codes, offset 0), and
the weight is that value times its block's scale, as ``reference.dequantize_*`` computes it in fp32.

Each program owns ``BN`` output features and walks K in steps of ``G`` sub-tiles of ``SUB`` columns,
``SUB`` a power of two that divides the block, so every sub-tile has one scale per row. The packed
weight is read exactly once and decoded in registers; nothing but ``y`` is written. Integer codes become
floats without an int -> float conversion (slow on the GPU): a code ORed into the mantissa of 2**23 is
the float 2**23 + code, and one exact subtraction removes 2**23, the offset and the zero point together.

- ``DOT=False`` (up to 16 input rows per program): fp32 FMAs on the CUDA cores. The decoded tile is
  reused for every row; each row's products are summed per sub-tile, then scaled:
  ``y[m, n] += s[n, g] * sum_j w[n, g, j] * x[m, g, j]``.
- ``DOT=True`` (``BM`` rows per program, tensor cores: 16 for a GEMV, 64 or 128 for the GEMM of larger
  batches, where one decoded tile serves that many rows): the decoded, scaled weight is cast to the input dtype
  (as ``dequantize(..., dtype=x.dtype)`` rounds it) and multiplied with ``tl.dot`` accumulating in fp32;
  fp32 inputs take the IEEE (not TF32) product. 4-bit codes need no interleaving: the high nibbles meet
  the even input columns and the low nibbles the odd ones, in two products.

Split-K (``split_k > 1``) gives each program a slice of K and adds its partial sums into an fp32
buffer with atomics; the bias and the cast follow in PyTorch.

The tiling: on a GPU, the first call of each (row count rounded up to a power of two, shape, format)
times a few candidates (``candidates``) in CUDA graphs (``device_us``) and keeps the fastest
(``tuned_configs``); elsewhere (the interpreter, CUDA-graph capture) the first candidate is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from ..ops import triton_interpreted
from ..timing import capture, replay_ms
from .common import gather, out_code, store_out

Tensor = torch.Tensor

MIN_SUB = 16  # a block whose largest power-of-two factor is below this is not handled here
MAX_SUB = 128  # widest sub-tile (columns sharing one scale per row)
DOT_ROWS = 16  # rows per program on the tensor-core path (tl.dot needs at least 16)
FMA_ROWS = 16  # most rows per program on the FMA path (one decoded tile serves them all)


@dataclass(frozen=True)
class GemvConfig:
    """Tiling of one launch: ``block_n`` output features per program, ``sub_tiles`` sub-tiles of K per
    loop step, ``split_k`` programs along K, ``dot`` (tensor cores) or fp32 FMAs, ``num_warps``."""

    block_n: int
    sub_tiles: int
    split_k: int = 1
    dot: bool = False
    num_warps: int = 4
    block_m: int = 0  # input rows per program on the tensor-core path (0: ``DOT_ROWS``)

    def rows_per_program(self, m: int) -> int:
        """Input rows each program takes for an ``m``-row input."""
        if self.dot:
            return self.block_m or DOT_ROWS
        return min(FMA_ROWS, triton.next_power_of_2(m))


def sub_tile(block_size: int) -> int:
    """Columns per sub-tile: the largest power of two dividing ``block_size``, at most ``MAX_SUB``."""
    return min(block_size & -block_size, MAX_SUB)


def supports(block_size: int) -> bool:
    """Whether the kernel handles this block size (its power-of-two factor is at least ``MIN_SUB``)."""
    return block_size > 0 and sub_tile(block_size) >= MIN_SUB


def candidates(m: int, n: int, kp: int, bits: int, block_size: int, sms: int = 132) -> list[GemvConfig]:
    """Tilings worth timing for an (m, kp) x (n, kp) product on a GPU of ``sms`` multiprocessors; the
    first is the default where nothing is timed. Each is (rows per program, code bytes of one row per
    loop step, warps); split-K is added until there are about four programs per multiprocessor. Several
    rows: the FMA path and the tensor-core path (table codes too: their table is read from shared memory,
    ``common.gather``); more than ``FMA_ROWS`` rows: the tensor-core path with 64 or 128 rows per program."""
    sub = sub_tile(block_size)
    row_bytes = sub // 2 if bits == 4 else sub

    def make(block_n: int, step_bytes: int, warps: int, dot: bool = False, block_m: int = 0) -> GemvConfig:
        g = max(1, step_bytes // row_bytes)
        cfg = GemvConfig(block_n, g, 1, dot, warps, block_m)
        programs = triton.cdiv(n, block_n) * triton.cdiv(m, cfg.rows_per_program(m))
        steps = triton.cdiv(kp, g * sub)
        split_k = 1
        while programs * split_k < 4 * sms and steps >= 4 * split_k:
            split_k *= 2
        return GemvConfig(block_n, g, split_k, dot, warps, block_m)

    if m == 1:
        return [make(32, 128, 4), make(16, 128, 4), make(64, 64, 4), make(16, 256, 8)]
    if m <= FMA_ROWS:
        return [make(16, 128, 4), make(32, 64, 4), make(32, 128, 4, dot=True), make(64, 64, 4, dot=True)]
    # a fused dequant-GEMM: wide tiles on the tensor cores, each decoded weight tile serving 64-128 rows
    return [make(128, 64, 8, dot=True, block_m=128), make(64, 64, 4, dot=True, block_m=64),
            make(128, 32, 8, dot=True, block_m=64)]  # fmt: skip


@triton.jit
def _decode(code, table, off, LUT: tl.constexpr):
    """int32 codes -> fp32 values before the scale: ``table[code]`` (the whole table, held by the program;
    ``common.gather`` reads it from shared memory), or ``code - (off - 2**23)`` from the float 2**23 + code
    (the code ORed into 2**23's mantissa) by one exact subtraction."""
    if LUT:
        v = gather(table, code)
    else:
        v = (code | 0x4B000000).to(tl.float32, bitcast=True) - off
    return v


@triton.jit
def _dot(acc, x, w, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + x @ w.T with fp32 accumulation; ``w`` already in x's dtype. UPCAST: both operands as fp32
    (Triton's interpreter mis-reads bf16 dot operands; the values are the same bf16 numbers)."""
    if UPCAST:
        out = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    elif IEEE:
        out = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    else:
        out = tl.dot(x, tl.trans(w), acc)
    return out


@triton.jit
def _load_x(ptrs, offs, mask, K, PACKED: tl.constexpr):
    """The input values meeting a 2-D tile of code bytes, loaded contiguously: ``offs`` holds the element
    column of each byte (the high nibble's, for packed codes); packed codes get the (even, odd) columns
    as a pair split off a trailing axis of 2, so no load is strided."""
    if PACKED:
        cols = offs[:, :, None] + tl.arange(0, 2)[None, None, :]
        pair = tl.load(
            (ptrs + offs)[:, :, None] + tl.arange(0, 2)[None, None, :], mask=mask[:, :, None] & (cols < K), other=0.0
        )
        a, b = tl.split(pair)
    else:
        a = tl.load(ptrs + offs, mask=mask & (offs < K), other=0.0)
        b = a
    return a, b


@triton.jit
def _gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, lut_ptr, bias_ptr, y_ptr,
    M, N, K, KP, QROW, NB, stride_xm, steps_per_split,
    BLOCK: tl.constexpr, SUB: tl.constexpr, G: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
    PACKED: tl.constexpr, SIGNED: tl.constexpr, LUT: tl.constexpr, OFFSET: tl.constexpr, HAS_ZP: tl.constexpr,
    LUT_N: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ATOMIC: tl.constexpr,
    OUT: tl.constexpr,
):  # fmt: skip
    H: tl.constexpr = SUB // 2 if PACKED else SUB  # code bytes of one row in one sub-tile
    L: tl.constexpr = 2 if PACKED else 1  # elements per code byte
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    local = tl.arange(0, BN)
    rows = pid_n * BN + local
    row_ok = rows < N
    g = tl.arange(0, G)
    j = tl.arange(0, H)
    # 64-bit only in the per-program bases; offsets within a tile and the scales fit in 32 bits.
    q_ptr += (pid_n * BN).to(tl.int64) * QROW
    q_offs = local[:, None, None] * QROW + (g[None, :, None] * H + j[None, None, :])
    m0 = pid_m * BM
    if DOT:
        acc = tl.zeros((BM, BN), tl.float32)
        ms = m0 + tl.arange(0, BM)
        x_ptrs = x_ptr + ms.to(tl.int64)[:, None] * stride_xm  # (BM, 1)
        x_offs = (L * tl.arange(0, G * H))[None, :]  # element column of code byte (g, j), flattened
        x_mask = (ms < M)[:, None]
    else:
        acc = tl.zeros((BN, BM), tl.float32)  # transposed: one column per input row
        mcol = tl.arange(0, BM)
        x_offs = g[:, None] * SUB + L * j[None, :]
        x_all = tl.full((G, H), 1, tl.int1)
    # ``off``: 2**23 plus what the code is measured from (signed int8 codes are read as byte ^ 0x80).
    off_c: tl.constexpr = 8388608.0 + OFFSET + (128.0 if SIGNED else 0.0)
    table = off_c  # unused without a table
    if LUT:
        table = tl.load(lut_ptr + tl.arange(0, LUT_N))
    n_steps = tl.cdiv(KP, G * SUB)
    first = pid_k * steps_per_split
    last = tl.minimum(first + steps_per_split, n_steps)
    for step in range(first, last):
        col0 = step * (G * SUB)  # first element column of this step
        sub_cols = col0 + g * SUB
        tile_ok = row_ok[:, None] & (sub_cols < KP)[None, :]
        s_offs = rows[:, None] * NB + sub_cols[None, :] // BLOCK
        s = tl.load(s_ptr + s_offs, mask=tile_ok, other=0.0)  # (BN, G)
        off = off_c
        if HAS_ZP:
            off = (tl.load(z_ptr + s_offs, mask=tile_ok, other=0).to(tl.float32) + off_c)[:, :, None]
        codes = tl.load(q_ptr + q_offs + step * (G * H), mask=tile_ok[:, :, None], other=0).to(tl.int32)
        if SIGNED:
            codes = codes ^ 0x80
        if PACKED:
            v_a = _decode(codes >> 4, table, off, LUT)
            v_b = _decode(codes & 15, table, off, LUT)
        else:
            v_a = _decode(codes, table, off, LUT)
            v_b = v_a
        if DOT:
            x_dtype = x_ptr.dtype.element_ty
            x_a, x_b = _load_x(x_ptrs, col0 + x_offs, x_mask, K, PACKED)
            w_a = tl.reshape(v_a * s[:, :, None], (BN, G * H)).to(x_dtype)
            acc = _dot(acc, x_a, w_a, IEEE, UPCAST)
            if PACKED:
                w_b = tl.reshape(v_b * s[:, :, None], (BN, G * H)).to(x_dtype)
                acc = _dot(acc, x_b, w_b, IEEE, UPCAST)
        else:
            for mi in tl.static_range(BM):
                row = m0 + mi
                x_a, x_b = _load_x(x_ptr + row.to(tl.int64) * stride_xm, col0 + x_offs, x_all & (row < M), K, PACKED)
                prod = v_a * x_a.to(tl.float32)[None, :, :]
                if PACKED:
                    prod += v_b * x_b.to(tl.float32)[None, :, :]
                part = tl.sum(tl.sum(prod, axis=2) * s, axis=1)  # (BN,): this row's sum over the step
                if BM == 1:
                    acc += part[:, None]
                else:
                    acc = tl.where(mcol[None, :] == mi, acc + part[:, None], acc)
    if DOT:
        out_offs = ms.to(tl.int64)[:, None] * N + rows[None, :]
        out_mask = (ms < M)[:, None] & row_ok[None, :]
        if HAS_BIAS and not ATOMIC:
            acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    else:
        out_offs = (m0 + mcol).to(tl.int64)[None, :] * N + rows[:, None]
        out_mask = (m0 + mcol < M)[None, :] & row_ok[:, None]
        if HAS_BIAS and not ATOMIC:
            acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    if ATOMIC:
        tl.atomic_add(y_ptr + out_offs, acc, mask=out_mask, sem="relaxed")
    else:
        store_out(y_ptr, out_offs, out_mask, acc, OUT)


# (rows rounded up to a power of two, n, kp, bits, block, lut, zero point, signed, dtype, device) -> the fastest.
_TUNED: dict[tuple, GemvConfig] = {}


def tuned_configs() -> dict[tuple, GemvConfig]:
    """The tilings picked so far on this process's GPUs (a copy), keyed as ``_TUNED``."""
    return dict(_TUNED)


@lru_cache(maxsize=16)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def can_time(x: Tensor) -> bool:
    """Whether kernels on ``x``'s device can be timed now: CUDA, compiled, not inside a graph capture."""
    return x.is_cuda and not triton_interpreted() and not torch.cuda.is_current_stream_capturing()


FLUSH_BYTES = 64 << 20  # more than an H100's or H200's L2 cache (50 / 60 MB)


def device_us(fn: Callable[[], object], device: torch.device, reps: int = 8, replays: int = 5) -> float:
    """Median device µs of one ``fn()`` reading its operands from HBM: CUDA graphs of ``reps`` rounds of
    (overwrite a buffer larger than the L2 cache, ``fn()``), less the same graph without ``fn``. Graphs
    leave out the host's Python and launch costs, which would otherwise decide between small kernels
    (a split-K launch sequence costs more host time than device time)."""
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)
    fn()  # compile and allocate outside the capture
    torch.cuda.synchronize(device)

    def rounds(with_fn: bool) -> Callable[[], None]:
        def body() -> None:
            for _ in range(reps):
                flush.fill_(1)
                if with_fn:
                    fn()

        return body

    with_fn, without = replay_ms(capture(rounds(True)), replays), replay_ms(capture(rounds(False)), replays)
    return max(0.0, 1e3 * (with_fn - without) / reps)


def _fastest(cands: list[GemvConfig], launch: Callable[[GemvConfig], Tensor], device: torch.device) -> GemvConfig:
    """The candidate with the lowest device time (``device_us``)."""
    times = {}
    for cfg in cands:
        try:
            times[cfg] = device_us(lambda c=cfg: launch(c), device)
        except Exception:  # noqa: BLE001 - a tiling this GPU cannot run (resources) is skipped
            continue
    if not times:
        raise RuntimeError("no GEMV tiling ran on this device")
    return min(times, key=times.get)


def quant_matmul(
    x: Tensor,
    codes: Tensor,
    scale: Tensor,
    block_size: int,
    bits: int,
    *,
    lut: Tensor | None = None,
    offset: int = 0,
    zero_point: Tensor | None = None,
    bias: Tensor | None = None,
    config: GemvConfig | None = None,
) -> Tensor:
    """``x @ W.T (+ bias)`` in ``x.dtype`` with ``W`` decoded tile by tile from ``codes`` and ``scale``.

    ``x``: (M, K) fp32/fp16/bf16. ``codes``: (N, KP // 2) uint8 packed (``bits=4``) or (N, KP) int8 (signed)
    or uint8 (``bits=8``), KP >= K a multiple of ``block_size``. ``scale``: (N, KP // block_size) fp32. A
    code's value is ``lut[code]`` (``lut``: 16 or 256 fp32 values) or ``code - offset - zero_point[n, block]``
    (``zero_point``: uint8 like ``scale``). ``bias``: (N,) or None. ``config``: a tiling (None: timed
    on a GPU, see the module docstring). Returns (M, N).
    """
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be 2-D fp32/fp16/bf16, got {tuple(x.shape)} {x.dtype}")
    if bits not in (4, 8) or not supports(block_size):
        raise ValueError(f"unsupported bits={bits} / block_size={block_size}")
    m, k = x.shape
    n, qrow = codes.shape
    kp = qrow * (2 if bits == 4 else 1)
    if scale.shape[1] * block_size != kp or k > kp or scale.shape[0] != n:
        raise ValueError(f"codes {tuple(codes.shape)} and scale {tuple(scale.shape)} do not fit x {tuple(x.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    signed = codes.dtype == torch.int8
    packed = (codes.view(torch.uint8), scale.contiguous(), lut, zero_point, offset, signed, bits, block_size)

    def launch(cfg: GemvConfig) -> Tensor:
        return _launch(x, packed, bias, cfg)

    if config is not None:
        return launch(config)
    bucket = triton.next_power_of_2(m)
    key = (bucket, n, kp, bits, block_size, lut is not None, zero_point is not None, signed, x.dtype, x.device)
    best = _TUNED.get(key)
    if best is None:
        cands = candidates(m, n, kp, bits, block_size, _multiprocessors(x.device))
        if not can_time(x):  # the interpreter, or inside a CUDA-graph capture: no timing
            return launch(cands[0])
        best = _TUNED[key] = _fastest(cands, launch, x.device)
    return launch(best)


def _launch(x: Tensor, packed: tuple, bias: Tensor | None, cfg: GemvConfig) -> Tensor:
    """One kernel launch (plus, for split-K, the zeroed fp32 buffer, the bias and the cast)."""
    codes, scale, lut, zero_point, offset, signed, bits, block_size = packed
    m, k = x.shape
    n, qrow = codes.shape
    kp = qrow * (2 if bits == 4 else 1)
    sub = sub_tile(block_size)
    bm = cfg.rows_per_program(m)
    n_steps = triton.cdiv(kp, cfg.sub_tiles * sub)
    per_split = triton.cdiv(n_steps, cfg.split_k)
    split = triton.cdiv(n_steps, per_split)
    if split > 1:
        y = torch.zeros((m, n), dtype=torch.float32, device=x.device)
        target = y
    else:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        target = y.view(torch.int16) if x.dtype == torch.bfloat16 else y
    dummy = scale  # never read: the flags below switch the pointer off
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, bm), split)
    _gemv_kernel[grid](
        x, codes, scale,
        dummy if zero_point is None else zero_point.contiguous(),
        dummy if lut is None else lut,
        dummy if bias is None or split > 1 else bias,
        target, m, n, k, kp, qrow, scale.shape[1], x.stride(0), per_split,
        BLOCK=block_size, SUB=sub, G=cfg.sub_tiles, BN=cfg.block_n, BM=bm, PACKED=bits == 4, SIGNED=signed,
        LUT=lut is not None, LUT_N=1 if lut is None else lut.numel(), OFFSET=float(offset),
        HAS_ZP=zero_point is not None, HAS_BIAS=bias is not None,
        DOT=cfg.dot, IEEE=x.dtype == torch.float32,
        UPCAST=x.dtype == torch.bfloat16 and triton_interpreted(), ATOMIC=split > 1, OUT=out_code(x.dtype),
        num_warps=cfg.num_warps,
    )  # fmt: skip
    if split > 1:
        if bias is not None:
            y += bias.float()
        return y.to(x.dtype)
    return y
