"""CPU backend: Numba kernels for every op of the backend contract (``dinat_np.kernels.backend.Backend``).

This package's top level is that contract's ops, plus ``set_up_process`` and ``set_num_threads``. The
ops live by family: ``attention`` (neighborhood attention, and global attention with ViT-rpb's bias),
``products`` (linear layers, the MLP, their epilogues and activations), ``conv`` (the 3x3 stride-2
convolution, the patch embedding), ``norm`` (LayerNorm), ``layout`` (data movement, weight layouts,
pad/crop/pool, patch merging). Beneath them: ``simd`` (vectors as wide as the target's
registers for the inner loops), ``gemm`` (the own matrix product) and ``blas`` (NumPy's OpenBLAS, called
from the kernels), ``threads`` (Numba's threading layer, kernel launches, the process-wide set-up),
``sharing`` (the thread count beside other processes), ``compile`` (the two-process cold start) and
``malloc`` (glibc's thresholds).

Importing the package changes nothing in the process. ``set_up_process()`` does the process-wide set-up
(threading layer, its environment variables, malloc thresholds) once: ``get_backend("cpu")`` calls it,
and so does every kernel launch, so that direct users of these functions get it before Numba's thread
pool starts.

The parallel kernels keep their prange bodies small: a thread's share of the work is a call of a plain
njit function (a band of tasks, rows or pixels), and code shared by kernels is such a function rather
than inlined. Numba copies and re-analyses a prange body several times over, inlined code included, and
compiles an inlined helper once per call site: split this way, a cold compile is much shorter, with the
same run time.
"""

from __future__ import annotations

from .attention import global_attention, na_av, na_qk, neighborhood_attention
from .conv import conv3x3_stride2, patch_embedding
from .layout import (conv_weight, crop, download, linear_weight, mean_pool, nchw_to_nhwc, pad_bottom_right,
                     patch_merging, upload)
from .norm import layer_norm
from .products import linear, linear_residual, mlp_residual
from .threads import set_num_threads, set_up_process

__all__ = [
    "conv3x3_stride2", "conv_weight", "crop", "download", "global_attention", "layer_norm", "linear",
    "linear_residual", "linear_weight", "mean_pool", "mlp_residual", "na_av", "na_qk", "nchw_to_nhwc",
    "neighborhood_attention", "pad_bottom_right", "patch_embedding", "patch_merging", "set_num_threads",
    "set_up_process", "upload",
]
