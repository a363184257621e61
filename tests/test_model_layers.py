"""Layers: the fused convolution tensor product equals e3nn's, cutoffs are smooth, the Bessel basis is right."""

from __future__ import annotations

import math

import pytest
import torch
from e3nn import o3

from pipeline.model.layers import (
    BesselBasis,
    FusedUVUTensorProduct,
    PolynomialCutoff,
    XPLORCutoff,
    conv_irreps_mid,
)


@pytest.mark.parametrize(
    "irreps_in, lmax, allowed",
    [
        ("8x0e", 2, "0e+1e+2e"),
        ("8x0e+4x1e+2x2e", 2, "0e+1e+2e"),
        ("8x0e+4x1e+2x2e", 2, "0e"),
        ("6x0e+3x1o+2x1e+2x2e", 2, "0e+0o+1o+1e+2e+2o"),  # O(3) with both parities
    ],
)
def test_fused_tensor_product_equals_e3nn(irreps_in, lmax, allowed):
    torch.manual_seed(0)
    parity = -1 if "o" in allowed else 1
    irreps_in, irreps_sh = o3.Irreps(irreps_in), o3.Irreps.spherical_harmonics(lmax, parity)
    mid, instructions, _ = conv_irreps_mid(irreps_in, irreps_sh, o3.Irreps(allowed))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # e3nn builds its Wigner-3j buffers in the default dtype
    try:
        ref = o3.TensorProduct(irreps_in, irreps_sh, mid, instructions, shared_weights=False, internal_weights=False)
    finally:
        torch.set_default_dtype(default)
    fused = FusedUVUTensorProduct(irreps_in, irreps_sh, mid, instructions).to(torch.float64)
    assert fused.weight_numel == ref.weight_numel
    n = 17
    x = torch.randn(n, irreps_in.dim, dtype=torch.float64, requires_grad=True)
    vec = torch.randn(n, 3, dtype=torch.float64)
    y = o3.spherical_harmonics(irreps_sh, vec, normalize=True).requires_grad_(True)
    w = torch.randn(n, ref.weight_numel, dtype=torch.float64, requires_grad=True)
    out_ref, out = ref(x, y, w), fused(x, y, w)
    assert torch.allclose(out, out_ref, atol=1e-12)
    probe = torch.randn_like(out)
    g_ref = torch.autograd.grad((out_ref * probe).sum(), (x, y, w))
    g = torch.autograd.grad((out * probe).sum(), (x, y, w))
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-12)


def test_cutoffs_are_smooth_and_vanish_at_cutoff():
    r = torch.linspace(0.5, 5.0, 2001, dtype=torch.float64, requires_grad=True)
    for env in (XPLORCutoff(5.0, 4.5), PolynomialCutoff(5.0, 6)):
        f = env(r)
        (df,) = torch.autograd.grad(f.sum(), r)
        assert f[-1].abs() < 1e-12 and df[-1].abs() < 1e-9
        assert torch.all(f <= 1 + 1e-12) and torch.all(f >= -1e-12)
    xplor = XPLORCutoff(5.0, 4.5)
    assert torch.allclose(xplor(torch.tensor([1.0, 4.49])), torch.ones(2))
    # the switch is C1 where it starts: no kink at r_on
    r_on = torch.tensor([4.5 - 1e-7, 4.5 + 1e-7], dtype=torch.float64, requires_grad=True)
    (d_on,) = torch.autograd.grad(xplor(r_on).sum(), r_on)
    assert d_on.abs().max() < 1e-5


def test_bessel_basis():
    basis = BesselBasis(5.0, 4, trainable=False)
    r = torch.tensor([1.3])
    expected = [2 / 5 * math.sin(n * math.pi * 1.3 / 5) / 1.3 for n in range(1, 5)]
    assert torch.allclose(basis(r)[0], torch.tensor(expected), atol=1e-6)
    assert not basis.freq.requires_grad
