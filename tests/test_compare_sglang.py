"""scripts/compare_sglang.py on CPU: how it cuts SGLang's file, and that its shims compile.
(The comparison itself needs GPUs and an SGLang checkout; no SGLang code is in this repo.)"""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("compare_sglang",
                                                  ROOT / "scripts" / "compare_sglang.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# The shape of SGLang's file, not its code: includes, an anonymous namespace with a using
# line for host types, device code, then the host launcher struct.
FAKE = """#include <sgl_kernel/ffi.h>
namespace {
using device::distributed::PushController;
using host::distributed::CustomAllReduceBase, host::distributed::CustomAllReduceRef;
struct ParallelQKNormParams { unsigned num_tokens; unsigned num_clean_up_count = 0; };
DEVICE_PART
template <typename DType, uint32_t kNumGPU, int64_t kQDim, int64_t kKDim, bool kUsePDL>
struct FusedParallelQKNormAcrossHead : public CustomAllReduceBase {
  HOST_PART
};
}  // namespace
"""


def test_device_source_keeps_the_device_part_only():
    code, clean_up = load_script().device_source(FAKE)
    assert clean_up
    assert code.startswith('#include "sglang_shims.cuh"\nnamespace sglang_cmp {')
    assert "DEVICE_PART" in code and "PushController" in code
    for gone in ("HOST_PART", "using host::", "sgl_kernel/ffi.h", "FusedParallelQKNorm"):
        assert gone not in code
    older, clean_up = load_script().device_source(FAKE.replace(
        "unsigned num_clean_up_count = 0; ", ""))
    assert not clean_up and "DEVICE_PART" in older


def test_device_source_rejects_another_file():
    with pytest.raises(SystemExit, match="no FusedParallelQKNormAcrossHead"):
        load_script().device_source("namespace {\n__global__ void f() {}\n}\n")


def test_shims_compile_with_nvrtc():
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc")
    from cupy_qknorm.compile import _check
    src = b'#include "sglang_shims.cuh"\n'
    prog, = _check(nvrtc.nvrtcCreateProgram(src, b"shims.cu", 0, [], []))
    try:
        opts = [b"-std=c++20", b"-default-device", f"-I{ROOT / 'scripts'}".encode(),
                b"--gpu-architecture=sm_90"]
        _check(nvrtc.nvrtcCompileProgram(prog, len(opts), opts), prog)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def test_check_verdict_fails_on_bad_outputs():
    verdict = load_script().check_verdict
    good = {"sglang T=64": (2.0, 28), "ours T=64": (1.0, 0)}
    assert verdict(good) is None
    assert "ours T=64: 3 elements past 1 ulp" in verdict({**good, "ours T=64": (2.0, 3)})
    assert "built or launched wrongly" in verdict({**good, "sglang T=64": (9.0, 100)})
    assert "built or launched wrongly" in verdict({**good, "sglang T=64": (float("nan"), 0)})
