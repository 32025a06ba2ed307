"""Runs every CUDA-backend op (and a tiny whole model) against the CPU backend; prints JSON max errors.

Meant to run in its own process with ``NUMBA_ENABLE_CUDASIM=1`` (numba.cuda's simulator), started by
``tests/test_cuda_sim.py``: the variable must be set before numba.cuda is first imported, and the main
pytest process keeps the real CPU backend. On a machine with a GPU it can also run without the variable:
then the same checks exercise the real device.

Usage: ``python tests/cuda_sim_checks.py [kernels|model|all|ptx]``. The last line of stdout is one JSON
object: ``{"check name": max_abs_error, ...}`` (errors as floats; shape mismatches are reported as inf).

``ptx`` needs no GPU and no simulator but the CUDA toolkit's NVVM and NVRTC (``numba-cuda[cu12]``): it
compiles every kernel of the backend to PTX for two architectures, which type-checks them as the real
compiler does (the simulator runs them as Python and accepts code that the compiler rejects), and
reports for each kernel the float64 instructions in it (there should be none outside ``mean_pool``)
and its static shared memory (at most 48 KiB).
"""

from __future__ import annotations

import importlib
import json
import pickle
import pkgutil
import re
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

from dinat_np import (AutoModelForImageClassification, DinatBackbone, DinatConfig, DinatForImageClassification,
                      DinatSConfig, NatIsotropicConfig)
from dinat_np.kernels import Conv, Linear, Norm, get_backend
from dinat_np.kernels.cuda import attention, conv, device, layout, norm, products

cpu = get_backend("cpu")
gpu: Any = None  # the CUDA backend package, once main() has checked that it runs here
rng = np.random.default_rng(1234)
results: dict[str, float] = {}
timings: dict[str, float] = {}


def normal(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.normal(size=shape) * scale).astype(np.float32)


def record(name: str, actual, expected) -> None:
    actual = gpu.download(actual) if not isinstance(actual, np.ndarray) else actual
    if actual.shape != expected.shape:
        results[name] = float("inf")
        print(f"{name}: shape {actual.shape} != {expected.shape}", file=sys.stderr)
        return
    results[name] = float(np.max(np.abs(actual.astype(np.float64) - expected)))


def up(array: np.ndarray):
    return gpu.upload(array)


def linear_pair(weight: np.ndarray, bias: np.ndarray | None) -> tuple[Linear, Linear]:
    """The same linear layer (PyTorch's ``(out, in)`` weight) on the GPU and on the CPU backend."""
    return (Linear(gpu.linear_weight(weight), None if bias is None else up(bias)),
            Linear(cpu.linear_weight(weight), bias))


def conv_pair(weight: np.ndarray, bias: np.ndarray | None) -> tuple[Conv, Conv]:
    """The same convolution (PyTorch's ``(out, in, k, k)`` weight) on the GPU and on the CPU backend."""
    return (Conv(gpu.conv_weight(weight), None if bias is None else up(bias)),
            Conv(cpu.conv_weight(weight), bias))


def norm_pair(weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> tuple[Norm, Norm]:
    """The same LayerNorm on the GPU and on the CPU backend."""
    return Norm(up(weight), up(bias), eps), Norm(weight, bias, eps)


def record_residual(name: str, actual: tuple, expected: tuple) -> None:
    """A residual op's ``(out, normed)``: both compared when a norm was given, else ``normed`` must be None."""
    record(f"{name}_out", actual[0], expected[0])
    if expected[1] is None:
        results[f"{name}_normed_is_none"] = 0.0 if actual[1] is None else float("inf")
    else:
        record(f"{name}_normed", actual[1], expected[1])


def check_kernels() -> None:
    # data movement and layouts
    x = normal(2, 3, 5, 7)
    record("upload_download", gpu.download(up(x)), x)
    record("nchw_to_nhwc", gpu.nchw_to_nhwc(x), cpu.nchw_to_nhwc(x))
    nhwc = normal(2, 5, 3, 6)
    record("pad_bottom_right", gpu.pad_bottom_right(up(nhwc), 7, 6), cpu.pad_bottom_right(nhwc, 7, 6))
    record("crop", gpu.crop(up(nhwc), 4, 2), cpu.crop(nhwc, 4, 2))
    record("mean_pool", gpu.mean_pool(up(nhwc)), cpu.mean_pool(nhwc))
    wide = normal(3, 2, 3, 70)  # more (image, channel) pairs than the simulator launches threads
    record("mean_pool_wide", gpu.mean_pool(up(wide)), cpu.mean_pool(wide))

    # LayerNorm: channels not a multiple of the 32 lanes, rows not a multiple of the 8 rows per block
    for channels in (5, 70):
        x = normal(3, 5, channels, scale=3.0) + 1.5
        norm_gpu, norm_cpu = norm_pair(normal(channels), normal(channels))
        record(f"layer_norm_c{channels}", gpu.layer_norm(up(x), norm_gpu), cpu.layer_norm(x, norm_cpu))

    # The tiled product kernels first: a GPU with CuPy would otherwise route products to cuBLAS.
    cublas = products._external_gemm
    products._external_gemm = None

    # linear with every activation: 70 rows x 20 in x 70 out (partial tiles in every direction)
    x = normal(2, 5, 7, 20)
    weight, bias = normal(70, 20, scale=0.3), normal(70)
    for activation in ("identity", "gelu", "gelu_new", "relu", "selu"):
        linear_gpu, linear_cpu = linear_pair(weight, None if activation == "identity" else bias)
        record(f"linear_{activation}", gpu.linear(up(x), linear_gpu, activation), cpu.linear(x, linear_cpu, activation))
    linear_gpu, linear_cpu = linear_pair(weight, bias)
    scale, residual = normal(70), normal(2, 5, 7, 70)
    norm_gpu, norm_cpu = norm_pair(normal(70), normal(70))
    record_residual("linear_residual", gpu.linear_residual(up(x), linear_gpu, up(scale), up(residual), norm=norm_gpu),
                    cpu.linear_residual(x, linear_cpu, scale, residual, norm=norm_cpu))
    record_residual("linear_residual_no_norm", gpu.linear_residual(up(x), linear_gpu, up(scale), up(residual)),
                    cpu.linear_residual(x, linear_cpu, scale, residual))
    # the MLP, 70 -> 40 -> 70 channels
    fc2_gpu, fc2_cpu = linear_pair(normal(70, 40, scale=0.3), normal(70))
    fc1_gpu, fc1_cpu = linear_pair(normal(40, 70, scale=0.3), normal(40))
    mlp_gpu = (up(residual), fc1_gpu, "gelu", fc2_gpu, up(scale), up(residual))
    mlp_cpu = (residual, fc1_cpu, "gelu", fc2_cpu, scale, residual)
    record_residual("mlp_residual", gpu.mlp_residual(*mlp_gpu, norm=norm_gpu),
                    cpu.mlp_residual(*mlp_cpu, norm=norm_cpu))
    record_residual("mlp_residual_no_norm", gpu.mlp_residual(*mlp_gpu), cpu.mlp_residual(*mlp_cpu))

    # the 64x64 tile kernel (large grids use it) on a product with several k-steps
    saved = products._SMALL_GRID
    products._SMALL_GRID = 0
    try:
        x = normal(70, 40)
        linear_gpu, linear_cpu = linear_pair(normal(66, 40, scale=0.3), normal(66))
        record("linear_tile64_gelu", gpu.linear(up(x), linear_gpu, "gelu"), cpu.linear(x, linear_cpu, "gelu"))
    finally:
        products._SMALL_GRID = saved

    # the epilogue kernels that follow an external (cuBLAS) product, with the product done on the host
    def host_gemm(a, b, out):
        out.copy_to_device(np.ascontiguousarray(gpu.download(a) @ gpu.download(b)))

    products._external_gemm = host_gemm
    try:
        x = normal(9, 12)
        linear_gpu, linear_cpu = linear_pair(normal(10, 12), normal(10))
        scale, residual = normal(10), normal(9, 10)
        record("external_gemm_selu", gpu.linear(up(x), linear_gpu, "selu"), cpu.linear(x, linear_cpu, "selu"))
        norm_gpu, norm_cpu = norm_pair(normal(10), normal(10))  # narrow rows: the 8-lane LayerNorm
        record_residual("external_gemm_residual",
                        gpu.linear_residual(up(x), linear_gpu, up(scale), up(residual), norm=norm_gpu),
                        cpu.linear_residual(x, linear_cpu, scale, residual, norm=norm_cpu))
    finally:
        products._external_gemm = cublas
    if cublas is not None:  # CuPy on a real GPU: its product too
        x = normal(70, 40)
        linear_gpu, linear_cpu = linear_pair(normal(66, 40, scale=0.3), normal(66))
        record("cupy_gemm_gelu", gpu.linear(up(x), linear_gpu, "gelu"), cpu.linear(x, linear_cpu, "gelu"))

    if device.CUPY is not None:  # arrays from CuPy's pool: a view keeps its block while others come and go
        x = normal(40, 30, scale=2.0)
        norm_gpu, norm_cpu = norm_pair(normal(30), normal(30))
        view = gpu.layer_norm(up(x), norm_gpu).reshape(30, 40)  # the op's own array is gone after this line
        for _ in range(5):
            gpu.layer_norm(up(normal(40, 30)), norm_gpu)  # same size: served from the pool's freed blocks
        record("cupy_pool_view_outlives_array", gpu.download(view).reshape(40, 30), cpu.layer_norm(x, norm_cpu))
        # arrays built without numba's constructors carry the type numba itself gives such an array
        from numba import cuda, typeof

        ours, numbas = device.empty((2, 3, 4)), cuda.device_array((2, 3, 4), np.float32)
        same = typeof(ours) == typeof(numbas) and typeof(device.reshaped(ours, (-1, 4))) == typeof(numbas.reshape(6, 4))
        results["cupy_pool_array_types"] = 0.0 if same else float("inf")

    # 3x3 stride-2 convolution on odd sizes, with and without bias
    x = normal(2, 7, 9, 3)
    weight, bias = normal(5, 3, 3, 3, scale=0.3), normal(5)
    for name, conv_bias in (("conv3x3_stride2", bias), ("conv3x3_stride2_nobias", None)):
        conv_gpu, conv_cpu = conv_pair(weight, conv_bias)
        record(name, gpu.conv3x3_stride2(up(x), conv_gpu), cpu.conv3x3_stride2(x, conv_cpu))

    # patch embedding: 4x4 patches of a 7x9 image (zero-padded to 8x12), 3x3 ones without bias
    for name, patch_size, conv_bias in (("patch_embedding_p4", 4, normal(5)), ("patch_embedding_p3_nobias", 3, None)):
        conv_gpu, conv_cpu = conv_pair(normal(5, 3, patch_size, patch_size, scale=0.3), conv_bias)
        record(name, gpu.patch_embedding(up(x), conv_gpu, patch_size), cpu.patch_embedding(x, conv_cpu, patch_size))
    # patch merging: odd height and width (zero-padded), then even ones
    for name, shape in (("patch_merging_odd", (2, 5, 7, 3)), ("patch_merging_even", (1, 4, 6, 5))):
        merged = normal(*shape)
        record(name, gpu.patch_merging(up(merged)), cpu.patch_merging(merged))

    # global attention (ViT-rpb): a 6x6 map (an even window) with the q/k/v bias and 33 channels per head,
    # a 5x5 one without bias and without the probabilities
    qkv, rpb, qkv_bias = normal(2, 6, 6, 3, 2, 33), normal(2, 11, 11), normal(3 * 2 * 33)
    expected_out, expected_attn = cpu.global_attention(qkv, rpb, 0.2, True, qkv_bias=qkv_bias)
    out, attn = gpu.global_attention(up(qkv), up(rpb), 0.2, True, qkv_bias=up(qkv_bias))
    record("global_attention_out", out, expected_out)
    record("global_attention_attn", attn, expected_attn)
    qkv, rpb = normal(1, 5, 5, 3, 3, 4), normal(3, 9, 9)
    out, attn = gpu.global_attention(up(qkv), up(rpb), 0.5)
    record("global_attention_odd_no_attn", out, cpu.global_attention(qkv, rpb, 0.5)[0])
    results["global_attention_no_attn_returns_none"] = 0.0 if attn is None else float("inf")

    # neighborhood attention: (batch, height, width, heads, head_dim, kernel_size, dilation)
    cases = [
        (1, 7, 9, 2, 5, 3, 1),  # two heads, windows shifted at the borders
        (2, 9, 8, 1, 6, 3, 2),  # dilation 2: sub-grids of different lengths
        (1, 11, 11, 1, 4, 5, 1),  # kernel 5
        (1, 6, 7, 1, 40, 3, 2),  # head_dim above a warp's 32 lanes
        (1, 10, 9, 2, 3, 3, 3),  # dilation 3
        (1, 8, 9, 1, 33, 7, 1),  # 49 neighbours: two groups of lane partials, and 33 channels
    ]
    for batch, height, width, heads, head_dim, kernel_size, dilation in cases:
        name = f"b{batch}_{height}x{width}_h{heads}_d{head_dim}_k{kernel_size}_dil{dilation}"
        q, k, v = (normal(batch, height, width, heads, head_dim) for _ in range(3))
        rpb = normal(heads, 2 * kernel_size - 1, 2 * kernel_size - 1)
        scale = head_dim**-0.5
        qkv = np.stack([q, k, v], axis=3)
        expected_out, expected_attn = cpu.neighborhood_attention(qkv, rpb, kernel_size, dilation, scale, True)
        out, attn = gpu.neighborhood_attention(up(qkv), up(rpb), kernel_size, dilation, scale, True)
        record(f"na_fused_out_{name}", out, expected_out)
        record(f"na_fused_attn_{name}", attn, expected_attn)
        logits = cpu.na_qk(q, k, rpb, kernel_size, dilation)
        record(f"na_qk_{name}", gpu.na_qk(up(q), up(k), up(rpb), kernel_size, dilation), logits)
        record(f"na_av_{name}", gpu.na_av(up(expected_attn), up(v), kernel_size, dilation),
               cpu.na_av(expected_attn, v, kernel_size, dilation))
    # a window too large for the kernel's shared memory: a clear error, not a failed compilation
    try:
        gpu.neighborhood_attention(up(normal(1, 45, 45, 3, 1, 2)), up(normal(1, 89, 89)), 45, 1, 1.0)
        results["na_kernel_size_limit_is_clear"] = float("inf")
    except ValueError as error:
        results["na_kernel_size_limit_is_clear"] = 0.0 if "at most 44" in str(error) else float("inf")
    # two Python threads using the backend at once (the ops serialise their launches)
    x = normal(2, 6, 6, 16)
    norm_gpu, norm_cpu = norm_pair(normal(16), normal(16))
    linear_gpu, linear_cpu = linear_pair(normal(24, 16, scale=0.3), normal(24))
    expected = cpu.linear(cpu.layer_norm(x, norm_cpu), linear_cpu, "gelu")
    errors: list[float] = []

    def work() -> None:
        try:
            for _ in range(2):
                normed = gpu.layer_norm(up(x), norm_gpu)
                y = gpu.download(gpu.linear(normed, linear_gpu, "gelu"))
                errors.append(float(np.max(np.abs(y - expected))))
        except Exception as error:  # reported as a failed check, not a crash of the whole run
            print(f"thread failed: {error!r}", file=sys.stderr)
            errors.append(float("inf"))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results["two_threads_layer_norm_linear"] = max(errors) if len(errors) == 4 else float("inf")

    # without attention output (the path the model takes by default)
    q, k, v = (normal(1, 9, 8, 1, 6) for _ in range(3))
    rpb = normal(1, 5, 5)
    qkv = np.stack([q, k, v], axis=3)
    out, attn = gpu.neighborhood_attention(up(qkv), up(rpb), 3, 2, 0.3, False)
    record("na_fused_no_attn", out, cpu.neighborhood_attention(qkv, rpb, 3, 2, 0.3, False)[0])
    results["na_fused_no_attn_returns_none"] = 0.0 if attn is None else float("inf")

    # the q/k/v product's bias folded into the kernel (b_q on the query, b_k dropped, b_v on the output),
    # head_dim over one channel chunk so that both chunks index the bias; bottom rows zero as if padded
    qkv = normal(2, 9, 8, 3, 2, 40)
    qkv[:, 7:] = 0.0
    qkv_bias, rpb = normal(3 * 2 * 40), normal(2, 5, 5)
    expected_out, expected_attn = cpu.neighborhood_attention(qkv, rpb, 3, 2, 0.2, True, qkv_bias=qkv_bias)
    out, attn = gpu.neighborhood_attention(up(qkv), up(rpb), 3, 2, 0.2, True, qkv_bias=up(qkv_bias))
    record("na_fused_qkv_bias_out", out, expected_out)
    record("na_fused_qkv_bias_attn", attn, expected_attn)
    out, _ = gpu.neighborhood_attention(up(qkv), up(rpb), 3, 2, 0.2, qkv_bias=up(qkv_bias))
    record("na_fused_qkv_bias_no_attn", out, expected_out)


def tiny_config() -> DinatConfig:
    # 32x32 input: stage maps 8x8, 4x4, 2x2, 1x1 against a 3x3 window -> stages 1-3 are padded
    # (stage 1 by dilation 2: 3 * 2 = 6 > 4), layer scale on, two labels.
    return DinatConfig(
        embed_dim=8, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 4], kernel_size=3,
        dilations=[[2], [1, 2], [1], [1]], mlp_ratio=2.0, layer_scale_init_value=0.5, num_labels=3,
        out_features=["stem", "stage2", "stage4"],
    )


def random_tensors(config: Any) -> dict[str, np.ndarray]:
    """HF-named weights with every tensor random (biases, rpb and norms included), not HF's init."""
    tensors = AutoModelForImageClassification.from_config(config, seed=0).state_dict()
    out = {}
    for name, tensor in tensors.items():
        if "norm" in name and name.endswith("weight"):
            out[name] = (1.0 + 0.2 * rng.normal(size=tensor.shape)).astype(np.float32)
        elif name.endswith("layer_scale_parameters"):
            out[name] = rng.uniform(0.3, 1.5, size=tensor.shape).astype(np.float32)
        else:
            out[name] = (0.3 * rng.normal(size=tensor.shape)).astype(np.float32)
    return out


def check_model() -> None:
    config = tiny_config()
    tensors = random_tensors(config)
    pixels = normal(2, 3, 32, 32)
    cpu_model = DinatForImageClassification(config, tensors=tensors, source="random")
    expected = cpu_model(pixels, output_hidden_states=True, output_attentions=True)

    with tempfile.TemporaryDirectory() as folder:
        cpu_model.save_pretrained(folder)
        gpu_model = DinatForImageClassification.from_pretrained(folder, device="cuda")
    results["model_device_is_cuda"] = 0.0 if gpu_model.device == "cuda" else float("inf")
    actual = gpu_model(pixels, output_hidden_states=True, output_attentions=True)
    record("model_logits", actual.logits, expected.logits)
    for i, (a, e) in enumerate(zip(actual.hidden_states, expected.hidden_states, strict=True)):
        record(f"model_hidden_states_{i}", a, e)
    for i, (a, e) in enumerate(zip(actual.reshaped_hidden_states, expected.reshaped_hidden_states, strict=True)):
        record(f"model_reshaped_hidden_states_{i}", a, e)
    for i, (a, e) in enumerate(zip(actual.attentions, expected.attentions, strict=True)):
        record(f"model_attentions_{i}", a, e)
    results["model_output_counts"] = 0.0 if (
        len(actual.hidden_states) == 5 and len(actual.attentions) == 4
    ) else float("inf")
    # through the standard pickle (to spawned processes, Dask, Ray, Spark): weights come back to the GPU
    copy = pickle.loads(pickle.dumps(gpu_model))
    results["model_pickled_device_is_cuda"] = 0.0 if copy.device == "cuda" else float("inf")
    record("model_pickled_logits", copy(pixels).logits, expected.logits)

    # backbone (feature maps go through the extra stage LayerNorms), moved with .to("cuda")
    backbone_tensors = {n[len("dinat."):]: t for n, t in tensors.items() if n.startswith("dinat.")}
    for stage in config.out_features:
        channels = 8 if stage == "stem" else 8 * 2 ** (int(stage[-1]) - 1)
        backbone_tensors[f"hidden_states_norms.{stage}.weight"] = normal(channels) + 1.0
        backbone_tensors[f"hidden_states_norms.{stage}.bias"] = normal(channels)
    cpu_backbone = DinatBackbone(config, tensors=backbone_tensors, source="random")
    gpu_backbone = cpu_backbone.to("cuda")
    moved = gpu_backbone.device == "cuda" and cpu_backbone.device == "cpu"
    results["backbone_to_cuda_device"] = 0.0 if moved else float("inf")
    image = pixels[1:]
    for i, (a, e) in enumerate(zip(gpu_backbone(image).feature_maps, cpu_backbone(image).feature_maps, strict=True)):
        record(f"backbone_feature_maps_{i}", a, e)


def family_configs() -> dict[str, Any]:
    """Tiny members of the family; at 37x35 pixels DiNAT_s's last two stages are padded for attention."""
    return {
        "dinat_s": DinatSConfig(embed_dim=8, depths=[1, 2, 1], num_heads=[1, 2, 2], kernel_size=3,
                                dilations=[[2], [1, 2], [1]], mlp_ratio=2.0, num_labels=3),
        "nat_isotropic": NatIsotropicConfig(patch_size=8, embed_dim=8, depth=2, num_heads=2, kernel_size=3,
                                            dilations=[1, 2], mlp_ratio=2.0, num_labels=3),
        "vitrpb": NatIsotropicConfig(attention="global", image_size=40, patch_size=8, embed_dim=8, depth=2, num_heads=2,
                                     mlp_ratio=2.0, num_labels=3),
    }


def check_family_models() -> None:
    pixels = normal(1, 3, 37, 35)
    for name, config in family_configs().items():
        cpu_model = AutoModelForImageClassification.model_class(config)(config, tensors=random_tensors(config),
                                                                         source="random")
        expected = cpu_model(pixels, output_hidden_states=True, output_attentions=True)
        actual = cpu_model.to("cuda")(pixels, output_hidden_states=True, output_attentions=True)
        record(f"family_{name}_logits", actual.logits, expected.logits)
        for field in ("hidden_states", "attentions"):
            ours, theirs = getattr(actual, field), getattr(expected, field)
            results[f"family_{name}_{field}_count"] = 0.0 if len(ours) == len(theirs) else float("inf")
            for i, (a, e) in enumerate(zip(ours, theirs, strict=False)):
                record(f"family_{name}_{field}_{i}", a, e)


def check_ptx() -> None:
    from numba import cuda, types

    import numba.cuda.dispatcher as dispatcher_module

    class _Device:  # PTX only: device functions ask "the current device" for its compute capability
        compute_capability = (9, 0)

    dispatcher_module.get_current_device = lambda: _Device()

    f32, i32, i64, flag = types.float32, types.int32, types.int64, types.boolean

    def array(ndim: int, dtype=types.float32) -> types.Array:
        return types.Array(dtype, ndim, "C")

    gemm = (array(2), array(2), array(2), array(1), flag, i64, i64, array(1), array(2))
    layer_norm = (array(2), array(1), array(1), f32, array(2))
    na = (array(6), array(1), flag, array(3)) + (array(1, i32),) * 4 + (i64, f32, array(5), array(5), flag)
    kernels = {
        "_smoke_kernel": (device._smoke_kernel, (array(1),)),
        "_nchw_to_nhwc_kernel": (layout._nchw_to_nhwc_kernel, (array(4), array(4))),
        "_top_left_kernel": (layout._top_left_kernel, (array(4), array(4))),
        "_mean_pool_kernel": (layout._mean_pool_kernel, (array(3), array(2))),
        "_epilogue_kernel": (products._epilogue_kernel, (array(2), array(1), flag, i64, i64, array(1), array(2))),
        "_im2col_kernel": (conv._im2col_kernel, (array(4), i64, i64, i64, i64, array(2))),
        "_patch_merging_kernel": (layout._patch_merging_kernel, (array(4), array(4))),
        "_na_qk_kernel": (attention._na_qk_kernel,
                          (array(5), array(5), array(3)) + (array(1, i32),) * 4 + (i64, i64, array(5))),
        "_na_av_kernel": (attention._na_av_kernel,
                          (array(5), array(5), array(1, i32), array(1, i32), i64, i64, array(5))),
        "_layer_norm_kernel_32": (norm._layer_norm_kernel(32), layer_norm),
        "_layer_norm_kernel_8": (norm._layer_norm_kernel(8), layer_norm),
    }
    for tile in products._GEMM_TILES:
        kernels[f"_gemm_kernel_{tile}"] = (products._gemm_kernel(tile), gemm)
    for kernel_size in (3, 5, 7, 9, 11, 13, 14):  # 14: ViT-rpb's global attention at 224 pixels
        kernels[f"_na_kernel_k{kernel_size}"] = (attention._na_kernel(kernel_size), na)

    # every kernel that a module of the backend defines is in the list (factories: by their name prefix)
    package = importlib.import_module("dinat_np.kernels.cuda")
    modules = [importlib.import_module(f"{package.__name__}.{info.name}")
               for info in pkgutil.iter_modules(package.__path__)]
    defined = {name for module in modules for name, value in vars(module).items()
               if type(value).__name__ == "CUDADispatcher" and not value.targetoptions.get("device", False)}
    missing = {name for name in defined if not any(k == name or k.startswith(name + "_") for k in kernels)}
    results["ptx_every_kernel_listed"] = 0.0 if not missing else float("inf")
    if missing:
        print(f"kernels without a PTX check: {sorted(missing)}", file=sys.stderr)

    float64_ops = re.compile(r"\b(?:add|sub|mul|fma|div|sqrt|rcp|max|min|neg|abs)(?:\.[a-z]+)*\.f64\b")
    for name, (kernel, signature) in kernels.items():
        for cc in ((7, 5), (9, 0)):
            ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=cc)
            shared = sum(int(n) for n in re.findall(r"\.shared \.align \d+ \.b8 \S+\[(\d+)\]", ptx))
            results[f"ptx_shared_over_48k_{name}_sm{cc[0]}{cc[1]}"] = float(max(0, shared - 48 * 1024))
            if name != "_mean_pool_kernel":  # its float64 sum is deliberate
                results[f"ptx_float64_ops_{name}_sm{cc[0]}{cc[1]}"] = float(len(float64_ops.findall(ptx)))


def main() -> None:
    global gpu
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    if which == "ptx":
        check_ptx()
        print(json.dumps(results))
        return
    gpu = get_backend("cuda")
    if which in ("kernels", "all"):
        start = time.perf_counter()
        check_kernels()
        timings["kernels"] = time.perf_counter() - start
    if which in ("model", "all"):
        start = time.perf_counter()
        check_model()
        check_family_models()
        timings["model"] = time.perf_counter() - start
    print(f"simulator={device.SIMULATOR} timings={timings}", file=sys.stderr)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
