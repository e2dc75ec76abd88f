import pytest
import torch

from quantize_cli.kernels.constants import FP4_CODEBOOK, NF4_CODEBOOK, codebook_tensor, nf8_codebook

bnb_functional = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize(("name", "values"), [("nf4", NF4_CODEBOOK), ("fp4", FP4_CODEBOOK)])
def test_4bit_codebooks_are_bitsandbytes(name: str, values: tuple[float, ...]) -> None:
    theirs = bnb_functional.get_4bit_type(name, device="cpu")
    ours = codebook_tensor(values)
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))


def test_nf8_codebook_construction() -> None:
    nf8 = torch.tensor(nf8_codebook(), dtype=torch.float64)
    assert nf8.numel() == 256
    assert torch.all(nf8[1:] > nf8[:-1])  # sorted, distinct
    assert nf8[0] == -1.0 and nf8[-1] == 1.0
    assert (nf8 == 0).sum() == 1
    assert (nf8 > 0).sum() == 128 and (nf8 < 0).sum() == 127
    # Independent check of one value: the largest positive quantile is ndtri(0.9677083) before
    # scaling, and the scaling is by the largest magnitude, which is that same quantile.
    from statistics import NormalDist

    top = NormalDist().inv_cdf(0.9677083)
    second = NormalDist().inv_cdf(0.9677083 - (0.9677083 - 0.5) / 128)
    assert nf8[-2].item() == pytest.approx(second / top, rel=1e-6)
