"""Fixtures shared by the test files; the helpers they import live in the tests.helpers package."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["own", "openblas", "numpy"])
def products(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with the CPU products on each path (``cpu.gemm.PRODUCTS``): the kernels' own product
    (correct on any CPU, used where it is the faster), NumPy's OpenBLAS called from the kernels, and
    NumPy's matmul (the fallback)."""
    from dinat_np.kernels.cpu import products

    if request.param == "openblas" and products._BLAS is None:
        pytest.skip("NumPy's bundled OpenBLAS (with openblas_set_num_threads_local) is not available here")
    monkeypatch.setattr(products, "_PRODUCTS", request.param)
    return request.param
