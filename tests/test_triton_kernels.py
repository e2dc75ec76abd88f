"""Triton kernels equal the reference bit for bit: codes, scales, zero points and dequantized values.

Runs on CUDA when there is one, else on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``,
exported before Python starts, as CI does); skipped when neither is available. Shapes stay small so
the interpreter runs the whole module in well under a minute.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from _kernel_cases import SCHEME_IDS, SCHEMES, check_hessian_choice, padded_blocks
from _kernel_cases import bits as _bits

from quantize_cli import dequantize, quantize
from quantize_cli.kernels import ops, reference, scale_search
from quantize_cli.kernels.constants import E2M1_BOUNDS, FP4_CODEBOOK, NF4_CODEBOOK, codebook_tensor, nf8_codebook

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from quantize_cli.kernels.triton import codebook, common, integer, search  # noqa: E402

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not (_INTERPRETED or torch.cuda.is_available()):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set before Python starts)", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (scheme, options): every format, int4 both ways.


def assert_same_state(x: torch.Tensor, scheme: str, block_size: int | None = None, **opts) -> None:
    """Triton and reference agree exactly on every stored tensor and on the dequantized output."""
    ref = quantize(x, scheme, block_size=block_size, backend="reference", **opts)
    tri = quantize(x, scheme, block_size=block_size, backend="triton", **opts)
    for field in ("qdata", "scale", "global_scale", "zero_point"):
        a, b = _bits(getattr(tri, field)), _bits(getattr(ref, field))
        assert (a is None) == (b is None), field
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, field
            assert torch.equal(a, b), f"{scheme} {field}: {(a != b).sum().item()} of {a.numel()} differ"
    out_tri = dequantize(tri, backend="triton")
    out_ref = dequantize(ref, backend="reference")
    assert out_tri.dtype == out_ref.dtype == x.dtype and out_tri.shape == x.shape
    assert torch.equal(out_tri, out_ref), f"{scheme} dequantize: {(out_tri != out_ref).sum().item()} differ"


def _weights(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Normal weights with an all-zero block, a negative absmax and a wide dynamic range."""
    x = torch.randn(shape) * torch.logspace(-3, 3, shape[-1])
    flat = x.reshape(-1)
    flat[:64] = 0.0
    flat[70] = -1.5 * flat[64:128].abs().max()
    return x.to(dtype).to(DEVICE)


@pytest.mark.parametrize(("scheme", "opts"), SCHEMES, ids=SCHEME_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 200), (2, 3, 256), (700,)], ids=str)
def test_matches_reference(scheme: str, opts: dict, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """Several rows, a last dimension the default block does not divide (padded), N-D and 1-D inputs."""
    assert_same_state(_weights(shape, dtype), scheme, **opts)


@pytest.mark.parametrize(("scheme", "opts"), SCHEMES, ids=SCHEME_IDS)
@pytest.mark.parametrize(
    ("shape", "block"),
    [((5, 96), 48), ((3, 330), 330), ((2, 9000), 9000)],
    ids=["block48", "per-row330", "per-row9000-chunked"],
)
def test_block_sizes(scheme: str, opts: dict, shape: tuple[int, int], block: int) -> None:
    """A block that is not a power of two, one scale per row, and a row wider than one tile (walked in
    chunks: statistics pass, then encode pass)."""
    assert_same_state(_weights(shape, torch.float16), scheme, block_size=block, **opts)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True)], ids=["int4", "int4-asym", "int8"])
def test_int_grouped_and_wide_tilings(dtype: torch.dtype, bits: int, symmetric: bool) -> None:
    """Block sizes on both sides of the grouped kernel's reach: one lane per block (16), several (64; 100,
    padded), a whole warp (the widest grouped block) and twice that (the (blocks, columns) kernel), over a
    row count that leaves the last program part empty."""
    chunk = 16 // torch.tensor([], dtype=dtype).element_size()
    widest = 32 * integer.LANE_PLAN[bits][0] * chunk
    assert integer.plan_groups(widest, 16 // chunk, bits) is not None
    assert integer.plan_groups(2 * widest, 16 // chunk, bits) is None
    qi, qr = ops.resolve("quantize_int", "triton", torch.device(DEVICE)), reference.quantize_int
    for block in [16, 64, 100, widest, 2 * widest]:
        x = _weights((5, 3 * block), dtype)
        for got, want in zip(qi(x, block, bits, symmetric), qr(x, block, bits, symmetric), strict=True):
            assert (got is None) == (want is None)
            assert got is None or torch.equal(got, want), f"block {block}: {(got != want).sum().item()} differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", [2, 10, 16, 32])
def test_nvfp4_narrow_blocks(dtype: torch.dtype, block: int) -> None:
    """NVFP4 blocks of at most 32 take the (chunk, block, vector) tile: one chunk (2), a padded block
    (10 of 16), the default 16 and 32, in every input dtype."""
    assert_same_state(_weights((6, 160), dtype), "nvfp4", block_size=block)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nvfp4_saturated_block_scales(dtype: torch.dtype) -> None:
    """A global scale far below amax / 2688 (as a user may pass one): most block scales saturate at 448 and
    quotients run far past the E2M1 table, so the block kernel redoes those tiles by IEEE division over the
    codes it stored first; tiles with no such block keep the fast codes."""
    x = _weights((8, 1024), dtype)
    x[4:] = x[4:] * 1e-6  # the later programs' tiles have no block out of range
    assert_same_state(x, "nvfp4", global_scale=torch.tensor(1e-4, device=DEVICE))


@pytest.mark.parametrize(("scheme", "opts"), SCHEMES, ids=SCHEME_IDS)
def test_extreme_magnitudes(scheme: str, opts: dict) -> None:
    """fp32 subnormals, tiny and huge blocks: scales near the ends of every format's range."""
    rows = [
        torch.full((64,), 1e-40),
        torch.linspace(-3e-39, 2e-39, 64),
        torch.linspace(-1e-30, 1e-30, 64),
        torch.linspace(-3e30, 1e30, 64),
        torch.randn(64) * 1e-20,
    ]
    assert_same_state(torch.stack(rows).to(DEVICE), scheme, block_size=64, **opts)


# ---- rounding ties and thresholds, worked out from the format tables ---------------------------------------


def _next_floats(v: torch.Tensor) -> torch.Tensor:
    """v and its fp32 neighbours on both sides."""
    return torch.cat([v, torch.nextafter(v, v + 1), torch.nextafter(v, v - 1)])


@pytest.mark.parametrize("values", [NF4_CODEBOOK, FP4_CODEBOOK, nf8_codebook()], ids=["nf4", "fp4", "nf8"])
def test_codebook_midpoint_ties(values: tuple[float, ...]) -> None:
    """Scaled values exactly on (and one fp32 step either side of) every midpoint: a block whose absmax
    is 1 scales by exactly 1, so the kernel sees these values unchanged."""
    bounds, _ = reference.codebook_search_tables(codebook_tensor(values))
    v = _next_floats(bounds).clamp(-1, 1)
    block = 64
    pad = (-v.numel()) % (block - 1)
    v = torch.cat([v, torch.zeros(pad)]).reshape(-1, block - 1)
    x = torch.cat([torch.ones(v.shape[0], 1), v], dim=1).to(DEVICE)  # each block's absmax is 1
    cb = codebook_tensor(values, DEVICE)
    pack = len(values) == 16
    q_ref, s_ref = reference.quantize_codebook(x, block, cb, pack)
    q_tri, s_tri = ops.resolve("quantize_codebook", "triton", x.device)(x, block, cb, pack)
    assert torch.equal(q_tri, q_ref) and torch.equal(s_tri, s_ref)


def _e4m3_values() -> torch.Tensor:
    """Every finite non-negative E4M3 value, ascending."""
    codes = torch.arange(0, 127, dtype=torch.uint8)
    return codes.view(torch.float8_e4m3fn).float()


def test_fp8_e4m3_rounding_every_midpoint() -> None:
    """Every E4M3 value, every midpoint between neighbours (ties to even) and one fp32 step either side,
    both signs, subnormals included. absmax 448 makes the block scale exactly 1."""
    vals = _e4m3_values()
    mids = (vals[:-1] + vals[1:]) / 2
    v = torch.cat([vals, _next_floats(mids)]).clamp(max=448.0)
    v = torch.cat([v, -v])
    block = 128
    pad = (-v.numel()) % (block - 1)
    v = torch.cat([v, torch.zeros(pad)]).reshape(-1, block - 1)
    x = torch.cat([torch.full((v.shape[0], 1), 448.0), v], dim=1).to(DEVICE)
    q_tri, s_tri = ops.resolve("quantize_fp8", "triton", x.device)(x, block)
    q_ref, s_ref = reference.quantize_fp8(x, block)
    assert torch.equal(s_tri, torch.ones_like(s_tri))
    assert torch.equal(q_tri.view(torch.uint8), q_ref.view(torch.uint8))
    # and decode: every code back to its value
    out = ops.resolve("dequantize_fp8", "triton", x.device)(q_tri, s_tri, block, torch.float32)
    assert torch.equal(out, q_ref.float())


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
def test_e2m1_thresholds(scheme: str) -> None:
    """Element magnitudes on each E2M1 decision bound and one fp32 step either side, both signs, with a
    block scale of exactly 1 (NVFP4: amax 6 and global scale 1; MXFP4: amax in [4, 8))."""
    bounds = torch.tensor(E2M1_BOUNDS)
    v = _next_floats(torch.cat([bounds, torch.tensor([0.0, 0.5, 6.0, 7.0])]))
    v = torch.cat([v, -v])
    block = 16 if scheme == "nvfp4" else 32
    pad = (-v.numel()) % (block - 1)
    v = torch.cat([v, torch.zeros(pad)]).reshape(-1, block - 1).clamp(-6, 6)
    x = torch.cat([torch.full((v.shape[0], 1), 6.0), v], dim=1).to(DEVICE)
    opts = {"global_scale": torch.tensor(1.0, device=DEVICE)} if scheme == "nvfp4" else {}
    assert_same_state(x, scheme, block_size=block, **opts)


@pytest.mark.parametrize("bits", [8, 4])
def test_int_round_half_to_even(bits: int) -> None:
    """x / s landing exactly on k + 0.5 rounds to even (torch.round), both signs."""
    qmax = 2 ** (bits - 1) - 1
    halves = torch.arange(-qmax, qmax, dtype=torch.float32) + 0.5
    x = torch.cat([torch.tensor([float(qmax)]), halves, torch.zeros(64 - 1 - halves.numel() % 64)])
    x = x[: (x.numel() // 64) * 64].reshape(-1, 64)
    x[:, 0] = float(qmax)  # scale exactly 1 in every block
    assert_same_state(x.to(DEVICE), f"int{bits}", block_size=64)


# ---- bucket lookups and the reciprocal division, checked densely -------------------------------------------


def _around(points: torch.Tensor, lo: float, hi: float, n: int = 1_000_000) -> torch.Tensor:
    """Every point with 50 fp32 neighbours each side, both zeros, the ends and a few ulps past them,
    a uniform sweep of [lo, hi] and magnitudes down to the subnormals, both signs."""
    g = torch.Generator().manual_seed(0)
    near, up, down = [points], points.clone(), points.clone()
    for _ in range(50):
        up, down = torch.nextafter(up, torch.tensor(float("inf"))), torch.nextafter(down, torch.tensor(-float("inf")))
        near += [up, down]
    ends = torch.tensor([lo, hi])
    for _ in range(3):
        ends = torch.cat([ends, torch.nextafter(ends[-2:], ends[-2:] * 2)])
    signs = torch.where(torch.rand(n // 4, generator=g) < 0.5, -1.0, 1.0)
    tiny = torch.exp2(-140 * torch.rand(n // 4, generator=g)) * signs
    sweep = torch.rand(n, generator=g) * (hi - lo) + lo
    return torch.cat([*near, torch.tensor([0.0, -0.0, 1e-45, -1e-45]), ends, sweep, tiny])


def _lookup_on_host(v: torch.Tensor, rows: torch.Tensor, scale: float, offset: float, shift: int, mask: int):
    """``common.lookup16`` with the same fp32 steps on the CPU."""
    shift_f = float(torch.tensor(shift, dtype=torch.int32).view(torch.float32)) if shift else 0.0
    row = rows[common.bucket_keys(v, scale, offset - common.KEY_MAGIC, shift_f) & mask]
    bound = (row & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    return torch.where(v > bound, row >> 40, row >> 32) & 0xFF


@pytest.mark.parametrize("values", [NF4_CODEBOOK, FP4_CODEBOOK, nf8_codebook()], ids=["nf4", "fp4", "nf8"])
def test_codebook_bucket_rows_equal_bucketize(values: tuple[float, ...]) -> None:
    """The bucket lookup (one row, one comparison) gives ``order[bucketize(v, bounds)]`` for v on and
    around every midpoint, +-0, +-1 and a dense sweep of [-1, 1]: the rows of the codebook kernel."""
    cb = codebook_tensor(values)
    tables = codebook.search_tables(cb, torch.device("cpu"))
    assert tables.rows is not None, "nf4, fp4 and nf8 take the bucket lookup"
    bounds, order = reference.codebook_search_tables(cb)
    v = _around(bounds, -1.0, 1.0)
    expected = order[torch.bucketize(v.clamp(-1, 1), bounds)].long()
    if tables.levels == 4:
        args = (tables.key_scale, tables.key_offset, tables.key_shift, tables.key_mask)
        got = _lookup_on_host(v, tables.rows, *args)
    else:
        shift = 0.0 if not tables.key_shift else float(torch.tensor(tables.key_shift).view(torch.float32))
        keys = common.bucket_keys(v, tables.key_scale, tables.key_offset - common.KEY_MAGIC, shift) & tables.key_mask
        idx = tables.rows[keys].long()
        got = idx + (v > tables.bounds[idx]).long()
    assert torch.equal(got, expected), f"{(got != expected).sum().item()} of {v.numel()} differ"


@pytest.mark.parametrize("n", [16, 200])
@pytest.mark.parametrize("kind", ["beyond-1", "crowded"])
def test_codebook_binary_search_fallback(n: int, kind: str) -> None:
    """Codebooks the bucket rows cannot take still quantize exactly, through the binary search: values
    beyond +-1 (bounds outside [-1, 1], where the reference's clamp matters) and values crowded closer
    than the finest grid (bounds 1e-4 apart)."""
    g = torch.Generator().manual_seed(n)
    if kind == "beyond-1":
        values = (torch.rand(n, generator=g) * 3 - 1.5).tolist()
    else:
        values = torch.linspace(-1, 1, n - 3).tolist() + [0.0001, 0.0002, 0.0003]
    cb = codebook_tensor(tuple(values), DEVICE)
    assert codebook.search_tables(cb, torch.device(DEVICE)).rows is None
    x = _weights((4, 256), torch.float32)
    pack = n <= 16
    q_ref, s_ref = reference.quantize_codebook(x, 64, cb, pack)
    q_tri, s_tri = ops.resolve("quantize_codebook", "triton", x.device)(x, 64, cb, pack)
    assert torch.equal(q_tri, q_ref) and torch.equal(s_tri, s_ref)


def test_e2m1_bucket_rows_equal_the_encoder() -> None:
    """``common.e2m1_lookup``'s rows give ``e2m1_encode`` for |v| <= E2M1_LIMIT: every decision bound and
    its neighbours (both signs), +-0, a dense sweep and tiny magnitudes."""
    limit = common.E2M1_LIMIT.value
    bounds = torch.tensor(E2M1_BOUNDS)
    v = _around(torch.cat([bounds, -bounds, torch.tensor([6.0, -6.0])]), -limit, limit).clamp(-limit, limit)
    rows = common.e2m1_rows(torch.device("cpu"))
    got = _lookup_on_host(v, rows, common.E2M1_KEY_SCALE.value, common.E2M1_KEY_OFFSET.value, 0, 255)
    expected = reference.e2m1_encode(v).long()
    assert torch.equal(got, expected), f"{(got != expected).sum().item()} of {v.numel()} differ"


@triton.jit
def _div_by_kernel(x_ptr, d_ptr, q_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=1.0)
    d = tl.load(d_ptr + offs, mask=offs < n, other=1.0)
    tl.store(q_ptr + offs, common.div_by(x, d, common.reciprocal(d)), mask=offs < n)


def test_div_by_equals_ieee_division() -> None:
    """``common.div_by`` (reciprocal, two corrections) rounds x / d exactly as IEEE division for d across
    [DIV_MIN, DIV_MAX], random significands of both (including all-ones ones) and quotients on and
    next to the midpoints of the integer, E4M3 and E2M1 grids."""
    g = torch.Generator().manual_seed(0)
    n = 1 << 18

    def significands(k: int) -> torch.Tensor:
        bits = torch.randint(0x3F800000, 0x40000000, (k,), generator=g, dtype=torch.int32)
        bits[: k // 8] = 0x3FFFFFFF - torch.randint(0, 64, (k // 8,), generator=g, dtype=torch.int32)
        return bits.view(torch.float32)

    d = significands(n) * torch.exp2(torch.randint(-80, 80, (n,), generator=g).float())
    x = significands(n) * torch.exp2(torch.randint(-30, 30, (n,), generator=g).float()) * d
    q = (torch.randint(0, 512, (n,), generator=g).float() + 0.5) / 64  # on grid midpoints
    on_mid = (q * d).float()
    x = torch.cat([x, on_mid, torch.nextafter(on_mid, on_mid * 2), torch.nextafter(on_mid, on_mid * 0)])
    d = torch.cat([d, d, d, d])
    x = torch.where(torch.rand(x.shape, generator=g) < 0.5, -x, x).contiguous()
    expected = x / d  # CPU: IEEE
    x, d = x.to(DEVICE), d.to(DEVICE)
    out = torch.empty_like(x)
    _div_by_kernel[(triton.cdiv(x.numel(), 4096),)](x, d, out, x.numel(), BLOCK=4096)
    assert torch.equal(out.cpu().view(torch.int32), expected.view(torch.int32))


def test_nvfp4_global_scale_matches_reference() -> None:
    fn = ops.resolve("nvfp4_global_scale", "triton", torch.device(DEVICE))
    for x in [torch.randn(300, 70) * 5, torch.zeros(10, 16), torch.randn(40000) * 1e-3]:
        x = x.to(DEVICE)
        assert torch.equal(fn(x), reference.nvfp4_global_scale(x))
    x = torch.randn(33, 48, dtype=torch.bfloat16, device=DEVICE)
    assert torch.equal(fn(x), reference.nvfp4_global_scale(x))
    # several programs of the amax pass (its plan depends on the element size), the largest element in the
    # ragged last one or in one of the middle
    for dtype, where in [(torch.float16, -1), (torch.float32, 50_000), (torch.bfloat16, 40_000)]:
        x = torch.randn(70_001, dtype=dtype)
        x[where] = -300.0
        x = x.to(DEVICE)
        assert torch.equal(fn(x), reference.nvfp4_global_scale(x))
        assert fn(x).item() == (torch.tensor(300.0) / (448 * 6)).item()  # fp32 quotient


# ---- NVFP4 / MXFP4 block-scale searches (sse, hessian) ------------------------------------------------------


def _hessian(cols: int, seed: int = 1) -> torch.Tensor:
    """A calibration X^T X with channels of very unequal loudness and correlated neighbours."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(4 * cols, cols, generator=g) * torch.logspace(-1, 1, cols)
    a = a + 0.5 * torch.roll(a, 1, dims=1)
    return (a.T @ a).to(DEVICE)


def _codes_under(x: torch.Tensor, state) -> torch.Tensor:
    """The reference's packed E2M1 codes of x under the state's own block scales."""
    xb = padded_blocks(x, state)
    if state.global_scale is not None:
        total = state.scale.float() * state.global_scale.float()
    else:
        total = torch.exp2(state.scale.float() - 127)
    codes = reference.e2m1_encode(reference._safe_div(xb, total.unsqueeze(-1)))
    return reference.pack_4bit(codes.reshape(xb.shape[0], -1))


def assert_search_matches(x: torch.Tensor, scheme: str, method: str, block_size: int | None = None, **opts) -> None:
    """SSE: every stored tensor and the dequantized output equal the reference's. Hessian: the same,
    except near-tied blocks (``check_hessian_choice``), whose codes are still the reference encoding under
    the scale the kernel kept."""
    if method == "sse":
        assert_same_state(x, scheme, block_size=block_size, method=method, **opts)
        return
    ref = quantize(x, scheme, block_size=block_size, backend="reference", method=method, **opts)
    tri = quantize(x, scheme, block_size=block_size, backend="triton", method=method, **opts)
    s_tri, s_ref = _bits(tri.scale), _bits(ref.scale)
    assert s_tri.dtype == s_ref.dtype and s_tri.shape == s_ref.shape
    assert torch.equal(tri.qdata, _codes_under(x, tri))
    check_hessian_choice(x, tri, ref, opts["hessian"])


SEARCHES = [("nvfp4", "sse"), ("nvfp4", "hessian"), ("mxfp4", "sse"), ("mxfp4", "hessian")]


@triton.jit
def _e2m1_index_kernel(y_ptr, idx_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    y = tl.load(y_ptr + offs, mask=offs < n, other=0.0)
    tl.store(idx_ptr + offs, common.e2m1_index(y), mask=offs < n)


@triton.jit
def _e2m1_round_half_kernel(y_ptr, v_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    y = tl.load(y_ptr + offs, mask=offs < n, other=0.0)
    tl.store(v_ptr + offs, search._e2m1_round_half(y), mask=offs < n)


def test_e2m1_magic_index_equals_the_encoder() -> None:
    """``common.e2m1_index`` (the fp32 magic-number E2M1 encoder of the searches' kept codes) equals
    e2m1_encode on every decision bound and grid value with 200 fp32 neighbours each side, on saturating,
    huge and infinite values, subnormals and a uniform sweep of [0, 8)."""
    points = torch.tensor([*E2M1_BOUNDS, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 7.0, 8.0, 1e30])
    near = [points]
    up, down = points.clone(), points.clone()
    for _ in range(200):
        up, down = torch.nextafter(up, torch.tensor(float("inf"))), torch.nextafter(down, torch.tensor(0.0))
        near += [up, down]
    y = torch.cat([*near, torch.rand(100_000) * 8, torch.tensor([float("inf"), 3e38, 1e-45, 1e-40, 1e-38])])
    y = y.to(DEVICE)
    idx = torch.empty_like(y, dtype=torch.int32)
    _e2m1_index_kernel[(triton.cdiv(y.numel(), 4096),)](y, idx, y.numel(), BLOCK=4096)
    assert torch.equal(idx, reference.e2m1_encode(y).to(torch.int32))


def test_search_fp16_e2m1_rounding_equals_the_encoder_on_every_fp16() -> None:
    """The searches' packed-fp16 rounding (SSE and Hessian) equals e2m1_decode(e2m1_encode(y)) on every
    non-negative fp16 value, subnormals and infinity included (all 31,745 of them)."""
    y = torch.arange(0, 0x7C01, dtype=torch.int16).view(torch.float16).to(DEVICE)
    v = torch.empty_like(y)
    _e2m1_round_half_kernel[(triton.cdiv(y.numel(), 4096),)](y, v, y.numel(), BLOCK=4096)
    assert torch.equal(v.float(), reference.e2m1_decode(reference.e2m1_encode(y.float())))


@pytest.mark.parametrize(("scheme", "method"), SEARCHES, ids=lambda v: v)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_search_matches_reference(scheme: str, method: str, dtype: torch.dtype) -> None:
    """Both searches, both formats, every input dtype; 200 columns are padded to whole blocks (and the
    Hessian with zero rows and columns)."""
    x = _weights((5, 200), dtype)
    opts = {"hessian": _hessian(200)} if method == "hessian" else {}
    assert_search_matches(x, scheme, method, **opts)


@pytest.mark.parametrize(("scheme", "method"), SEARCHES, ids=lambda v: v)
@pytest.mark.parametrize(("block", "cols"), [(6, 24), (48, 96), (330, 330)], ids=["block6", "block48", "block330"])
def test_search_block_sizes(scheme: str, method: str, block: int, cols: int) -> None:
    """A block under the Hessian kernel's 16-wide dot (padded), one that is not a power of two, and a
    wide one (SSE: split over threads; Hessian: wider than the kernel takes, so the reference runs)."""
    x = _weights((3, cols), torch.float16)
    opts = {"hessian": _hessian(cols)} if method == "hessian" else {}
    assert_search_matches(x, scheme, method, block_size=block, **opts)


@pytest.mark.parametrize(("scheme", "method"), SEARCHES, ids=lambda v: v)
def test_search_many_row_tiles(scheme: str, method: str) -> None:
    """More rows than one program takes: programs walk column blocks fastest, then row tiles."""
    x = _weights((300, 64), torch.bfloat16)
    opts = {"hessian": _hessian(64)} if method == "hessian" else {}
    assert_search_matches(x, scheme, method, **opts)


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
def test_search_extreme_magnitudes(scheme: str) -> None:
    """fp32 subnormals, tiny and huge blocks, and (NVFP4) a global scale far too small or too large for
    the weights: candidate scales that underflow to 0, saturate E4M3, or sit at E8M0's ends."""
    rows = [
        torch.full((32,), 1e-40),
        torch.linspace(-3e-39, 2e-39, 32),
        torch.linspace(-1e-30, 1e-30, 32),
        torch.linspace(-3e30, 1e30, 32),
        torch.randn(32) * 1e-20,
        torch.randn(32),
    ]
    x = torch.stack(rows).to(DEVICE)
    assert_search_matches(x, scheme, "sse")
    if scheme == "nvfp4":
        for gs in (1e-38, 1e-3, 1e30):
            assert_search_matches(x, scheme, "sse", global_scale=torch.tensor(gs, device=DEVICE))


def test_search_ties_keep_the_first_candidate() -> None:
    """Blocks already on a coarse grid: several candidate scales reproduce them exactly (error 0), and
    the first of those wins in both implementations."""
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    x = grid[torch.randint(0, 8, (4, 64))] * torch.where(torch.rand(4, 64) < 0.5, -1.0, 1.0)
    x[:, 0] = 6.0
    assert_search_matches(x.to(DEVICE), "nvfp4", "sse", global_scale=torch.tensor(1.0, device=DEVICE))
    assert_search_matches(x.to(DEVICE), "mxfp4", "sse")


# ---- the custom ops ---------------------------------------------------------------------------------------------


ALL_OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _op_samples() -> list[tuple[str, tuple]]:
    x = torch.randn(4, 64, device=DEVICE, dtype=torch.float16)
    nf4 = codebook_tensor(NF4_CODEBOOK, DEVICE)
    nf8 = codebook_tensor(nf8_codebook(), DEVICE)
    gs = reference.nvfp4_global_scale(x)
    q4, s4 = reference.quantize_codebook(x, 32, nf4, True)
    q8, s8 = reference.quantize_codebook(x, 32, nf8, False)
    qi, si, _ = reference.quantize_int(x, 32, 8, True)
    qa, sa, za = reference.quantize_int(x, 32, 4, False)
    qf, sf = reference.quantize_fp8(x, 32)
    qn, sn = reference.quantize_nvfp4(x, 16, gs)
    qm, sm = reference.quantize_mxfp4(x, 32)
    h = _hessian(64)
    return [
        ("quantize_codebook", (x, 32, nf4, True)),
        ("quantize_codebook", (x, 32, nf8, False)),
        ("dequantize_codebook", (q4, s4, nf4, 32, True, torch.bfloat16)),
        ("dequantize_codebook", (q8, s8, nf8, 32, False, torch.float32)),
        ("quantize_int", (x, 32, 8, True)),
        ("quantize_int", (x, 32, 4, False)),
        ("dequantize_int", (qi, si, None, 32, 8, torch.float16)),
        ("dequantize_int", (qa, sa, za, 32, 4, torch.float32)),
        ("quantize_fp8", (x, 32)),
        ("dequantize_fp8", (qf, sf, 32, torch.float16)),
        ("nvfp4_global_scale", (x,)),
        ("quantize_nvfp4", (x, 16, gs)),
        ("dequantize_nvfp4", (qn, sn, gs, 16, torch.bfloat16)),
        ("quantize_mxfp4", (x, 32)),
        ("dequantize_mxfp4", (qm, sm, 32, torch.float16)),
        ("search_nvfp4", (x, 16, gs, None)),
        ("search_nvfp4", (x, 16, gs, scale_search.hessian_blocks(h, 16))),
        ("search_mxfp4", (x, 32, None)),
        ("search_mxfp4", (x, 32, scale_search.hessian_blocks(h, 32))),
    ]


@pytest.mark.parametrize(("name", "args"), _op_samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_custom_op_opcheck(name: str, args: tuple) -> None:
    """Schema, fake (meta) implementation and dispatch of every quanta:: op (torch.library.opcheck)."""
    ops.has_triton(name)  # registers the ops
    utils = ALL_OPCHECKS
    if any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in args):
        # SchemaCheckMode compares inputs before/after with allclose, which has no float8 kernel on the CPU.
        utils = tuple(u for u in utils if u != "test_schema")
    torch.library.opcheck(getattr(torch.ops.quanta, name), args, test_utils=utils)


def test_ops_table_holds_custom_ops() -> None:
    from quantize_cli.kernels.library import TRITON_OPS  # noqa: PLC0415

    assert set(TRITON_OPS) <= set(ops.REFERENCE)
    assert all(ops.has_triton(name) for name in TRITON_OPS)
    assert ops.resolve("quantize_fp8", "triton", torch.device(DEVICE)) is torch.ops.quanta.quantize_fp8


def test_torch_compile_sees_one_op() -> None:
    """The fake implementations let torch.compile trace through the ops without graph breaks."""
    fn = ops.resolve("quantize_mxfp4", "triton", torch.device(DEVICE))
    deq = ops.resolve("dequantize_mxfp4", "triton", torch.device(DEVICE))

    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        q, s = fn(x, 32)
        return deq(q, s, 32, torch.float32)

    x = torch.randn(8, 64, device=DEVICE)
    compiled = torch.compile(roundtrip, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), roundtrip(x))


# ---- refusals ------------------------------------------------------------------------------------------------


def test_bad_arguments_are_refused() -> None:
    x = torch.randn(2, 64, device=DEVICE)
    nf8 = codebook_tensor(nf8_codebook(), DEVICE)
    with pytest.raises(ValueError, match="divide"):
        ops.resolve("quantize_fp8", "triton", x.device)(x, 48)
    with pytest.raises(ValueError, match="16 values"):
        ops.resolve("quantize_codebook", "triton", x.device)(x, 64, nf8, True)
    with pytest.raises(ValueError, match="4 or 8 bits"):
        ops.resolve("quantize_int", "triton", x.device)(x, 64, 6, True)
    with pytest.raises(ValueError, match="asymmetric"):
        ops.resolve("quantize_int", "triton", x.device)(x, 64, 8, False)
    q, s = reference.quantize_fp8(x, 64)
    with pytest.raises(ValueError, match="float64"):
        ops.resolve("dequantize_fp8", "triton", x.device)(q, s, 64, torch.float64)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU-only: the refusal of forced Triton without the interpreter")
def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        ops.resolve("quantize_fp8", "triton", torch.device("cpu"))
    assert ops.resolve("quantize_fp8", "auto", torch.device("cpu")) is reference.quantize_fp8


def test_e2m1_strict_thresholds_are_one_step_below_the_odd_bounds() -> None:
    """The kernels' '>' thresholds equal the reference's '>=' on odd-index bounds."""
    from quantize_cli.kernels.triton.common import _T  # noqa: PLC0415

    for i, (t, b) in enumerate(zip(_T, E2M1_BOUNDS, strict=True)):
        want = np.nextafter(np.float32(b), np.float32(0)) if i % 2 else np.float32(b)
        assert np.float32(t) == want
