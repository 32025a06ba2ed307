#!/usr/bin/env bash
# Smoke test of dinat-np on aarch64 (arm64, NEON) without ARM hardware: Debian's arm64 Python run by
# qemu-user on an x86-64 machine (issue 24). It checks that the kernels compile for AArch64 and give the
# same numbers as on x86-64; qemu emulates the instructions, not their speed, so it times nothing.
#
# Prerequisites: an x86-64 Debian 12 or newer, run as root (apt-get installs qemu-user and mmdebstrap),
# Debian's and PyPI's package archives reachable, about 1 GB of disk; an x86-64 Python with dinat-np
# installed from this tree, for the x86 side of the comparison (X86_PYTHON, default .venv/bin/python).
# A first run took 11-13 minutes on one core of an x86-64 VM, mostly Numba compiling under emulation (a
# run that reuses WORK_DIR and its compiled kernels, about 4): start it with `nice`.
#
#   benchmarks/aarch64_smoke.sh [WORK_DIR]     (default /tmp/dinat-np-arm64; kept for the next run)
#
# qemu emulates its 'max' CPU by default (SVE and SME, for which NumPy's OpenBLAS picks its ARMv9 SME
# kernels; LLVM compiles for plain NEON either way, see docs/platforms.md); QEMU_CPU=cortex-a72 in the
# environment emulates a NEON-only ARMv8.0 core instead.
#
# What it does, in WORK_DIR:
#   1. root/: a Debian 12 arm64 tree (python3.11, libgomp1, libstdc++6; unpacked by mmdebstrap, nothing run
#      in it);
#   2. site/: this tree's wheel and its runtime dependencies, pip's aarch64 wheels, at the versions the
#      x86 Python has (so both sides run the same NumPy, Numba and LLVM), and pytest;
#   3. under qemu-aarch64 (where qemu does not emulate /proc/cpuinfo, as 7.2 in Debian 12 does not, LLVM
#      compiles for a generic AArch64 CPU: NEON, no SVE): what the CPU backend chose (threading layer,
#      vector width, matrix products), then `dinat-classify --model digits-demo` on the demo's samples
#      (each must get its own digit), then the demo model's logits on those samples against the x86
#      Python's (at most 1e-4 apart), then the test files that compare the models with the PyTorch
#      reference fixtures and the three product paths with float64 (tests/test_models.py,
#      tests/test_cpu_products.py, without the slow ones).
# Exit status 0 when every step passed.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mkdir -p "${1:-/tmp/dinat-np-arm64}" && cd "${1:-/tmp/dinat-np-arm64}" && pwd)
X86_PYTHON=${X86_PYTHON:-$REPO/.venv/bin/python}
ROOT=$WORK/root
SITE=$WORK/site
SAMPLES=("$REPO"/weights/digits-demo/samples/*.png)

step() { printf '\n== %s\n' "$*"; }

step "qemu-user and mmdebstrap"
if ! command -v qemu-aarch64 >/dev/null || ! command -v mmdebstrap >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user mmdebstrap
fi
qemu-aarch64 --version | head -1

step "Debian 12 arm64 tree in $ROOT"
if [ ! -x "$ROOT/usr/bin/python3.11" ]; then
    # extract: the packages and their dependencies unpacked, no maintainer script run (none is needed to
    # run Python); libgomp1 is the GNU OpenMP that Numba's threading layer loads, libstdc++6 LLVM's C++ runtime
    mmdebstrap --arch=arm64 --variant=extract --include=python3.11,libgomp1,libstdc++6 bookworm "$ROOT"
fi

# The arm64 Python as a program of this machine: qemu-aarch64 looks for the dynamic loader and every shared
# library in the tree first (-L), and gives Python this wrapper as argv[0] (-0), so that sys.executable,
# which some tests start in a subprocess, runs under qemu too (no binfmt_misc registration is needed).
mkdir -p "$WORK/bin"
printf '#!/bin/sh\nexec qemu-aarch64 -0 "$0" -L "%s" "%s" "$@"\n' "$ROOT" "$ROOT/usr/bin/python3.11" \
    >"$WORK/bin/python3.11"
chmod +x "$WORK/bin/python3.11"
# -P: dinat_np is the wheel in $SITE, not the source folder of the current directory
arm_python() { PYTHONPATH=$SITE NUMBA_CACHE_DIR=$ARM_CACHE "$WORK/bin/python3.11" -P "$@"; }

step "aarch64 wheels in $SITE"
# this tree as a wheel, built anew each run so that the run checks the tree as it is now
rm -rf "$WORK/wheel" && "$X86_PYTHON" -m pip wheel -q --no-deps -w "$WORK/wheel" "$REPO"
if [ ! -d "$SITE/numba" ]; then
    # the x86 Python's versions of the runtime dependencies, so that both sides compute with the same code
    "$X86_PYTHON" - >"$WORK/constraints.txt" <<'EOF'
import importlib.metadata as metadata
for name in ("numpy", "numba", "llvmlite", "pillow", "safetensors", "ml_dtypes", "huggingface_hub", "filelock"):
    print(f"{name}=={metadata.version(name)}")
EOF
    cat "$WORK/constraints.txt"
    # NumPy >= 2.3 publishes manylinux_2_28 wheels only; bookworm's glibc is 2.36
    "$X86_PYTHON" -m pip install -q --no-warn-conflicts --target "$SITE" --only-binary=:all: --python-version 3.11 \
        --implementation cp --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
        -c "$WORK/constraints.txt" "$WORK"/wheel/dinat_np-*.whl pytest
else
    "$X86_PYTHON" -m pip install -q --no-warn-conflicts --target "$SITE" --no-deps --upgrade "$WORK"/wheel/dinat_np-*.whl
fi
if [ ! -d "$SITE/pytest" ]; then  # a work folder whose wheels were installed without it
    "$X86_PYTHON" -m pip install -q --no-warn-conflicts --target "$SITE" --only-binary=:all: --python-version 3.11 \
        --implementation cp --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 pytest
fi

# Numba's cache of a kernel is invalidated only when the kernel's own file changes, not when a module it
# inlines (simd.py) does: both sides compile into caches named after this tree's Python sources.
SOURCES=$(cd "$REPO" && find dinat_np cli -name '*.py' | sort | xargs cat | sha256sum | cut -c1-16)
ARM_CACHE=$WORK/numba-cache/aarch64-$SOURCES
X86_CACHE=$WORK/numba-cache/x86_64-$SOURCES

step "the platform as dinat-np sees it (under qemu-aarch64)"
arm_python - <<'EOF'
import ctypes
import platform

from llvmlite import binding
import numba
import numpy as np

from dinat_np.kernels import get_backend
from dinat_np.kernels.cpu import blas, gemm, simd, threads

print("machine", platform.machine(), "| numpy", np.__version__, "| numba", numba.__version__,
      "| LLVM", ".".join(map(str, binding.llvm_version_info)))
print("LLVM target CPU", binding.get_host_cpu_name(), binding.get_host_cpu_features().flatten())
get_backend("cpu")
print("set-up", threads.set_up_process(), "| vector lanes", simd.LANES, "| products", gemm.PRODUCTS,
      "| threads", numba.get_num_threads(), "| layer", numba.threading_layer())
for path in blas._bundled_openblas():  # which of its kernels NumPy's OpenBLAS chose for this CPU
    library = ctypes.CDLL(str(path))
    for name in ("scipy_openblas_get_corename64_", "openblas_get_corename"):
        if hasattr(library, name):
            getattr(library, name).restype = ctypes.c_char_p
            print("NumPy's OpenBLAS", path.name, getattr(library, name)().decode())
EOF

step "dinat-classify --model digits-demo on ${#SAMPLES[@]} samples (under qemu-aarch64)"
arm_python -m dinat_np.cli.classify --model digits-demo --json --no-progress "${SAMPLES[@]}" \
    >"$WORK/classify.json"
"$X86_PYTHON" - "$WORK/classify.json" <<'EOF'
import json
import sys
from pathlib import Path

failed = 0
for record in json.load(open(sys.argv[1])):
    best = record["predictions"][0]
    expected = Path(record["path"]).stem.removeprefix("digit_")  # the samples are named by their digit
    failed += best["label"] != expected
    print(f"{Path(record['path']).name}: {best['label']} ({best['score']:.2%})", "" if best["label"] == expected else "WRONG")
sys.exit(failed > 0)
EOF

step "the demo model's logits on aarch64 against x86-64"
logits_program='
import sys

import numpy as np

from dinat_np import ImageClassifier

classifier = ImageClassifier.from_pretrained("digits-demo", progress=False)
pixels = np.stack([classifier.processor.preprocess(path) for path in sys.argv[2:]])
np.save(sys.argv[1], classifier.model(pixels).logits)
'
arm_python -c "$logits_program" "$WORK/logits-aarch64.npy" "${SAMPLES[@]}"
NUMBA_CACHE_DIR=$X86_CACHE "$X86_PYTHON" -c "$logits_program" "$WORK/logits-x86_64.npy" "${SAMPLES[@]}"
"$X86_PYTHON" - "$WORK/logits-aarch64.npy" "$WORK/logits-x86_64.npy" <<'EOF'
import sys

import numpy as np

arm, x86 = np.load(sys.argv[1]), np.load(sys.argv[2])
difference = float(np.abs(arm - x86).max())
print(f"logits {arm.shape}: largest difference aarch64 - x86-64 {difference:.2e} (allowed 1e-4)")
sys.exit(not difference <= 1e-4)
EOF

step "tests/test_models.py, tests/test_cpu_products.py (under qemu-aarch64)"
cd "$REPO"
arm_python -m pytest -q -p no:cacheprovider --import-mode=append -m "not slow" tests/test_models.py tests/test_cpu_products.py
