"""Kernel launches with less host time than CuPy's generic path: cuLaunchKernelEx through
ctypes, the launch parameters (params.PARAMS) packed once into a buffer of the launch's
own and passed by pointer, the grid and block fixed when the launch is bound."""
from __future__ import annotations

import ctypes
from typing import NamedTuple

import numpy as np

from ..errors import QKNormError
from ..params import PARAMS

# The same bytes as a numpy record, for CuPy's own launch (the fallback where libcuda or a
# kernel's function handle cannot be reached): one opaque, 8-byte aligned field.
PARAMS_DTYPE = np.dtype([("raw", np.uint64, (PARAMS.size // 8,))], align=True)


class Kernel(NamedTuple):
    """A loaded kernel: its CuPy RawKernel (None in tests), its CUfunction (None where
    CuPy's launch must be used) and its name."""
    raw: object
    handle: int | None
    name: str


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint),
                ("gridDimZ", ctypes.c_uint), ("blockDimX", ctypes.c_uint),
                ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
assert ctypes.sizeof(_LaunchAttribute) == 72 and ctypes.sizeof(_LaunchConfig) == 56


def _driver():
    """(cuLaunchKernelEx, cuGetErrorName) from libcuda, or None where it cannot be loaded."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        launch_ex, error_name = lib.cuLaunchKernelEx, lib.cuGetErrorName
    except (OSError, AttributeError):
        return None
    launch_ex.restype = ctypes.c_int
    error_name.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    return launch_ex, error_name


class Launcher:
    """Binds kernels to launch functions go(stream). A bound launch owns its parameter
    buffer and its launch configuration, so a call is one store of the stream into the
    configuration and one foreign call with ready-made ctypes arguments (no argtypes:
    their conversions cost more than the call). Falls back to CuPy's launch where libcuda
    or a kernel's function handle cannot be reached.

    With `pdl`, launches that ask for it carry programmatic stream serialization: the
    kernel may start while the previous kernel of the stream finishes, and must itself
    wait (griddepcontrol.wait) before it touches memory that kernel may write.

    `driver` replaces libcuda's (cuLaunchKernelEx, cuGetErrorName): tests pass Python
    functions that record the launches."""

    def __init__(self, pdl=False, driver=None):
        driver = _driver() if driver is None else driver
        self._launch_ex, self._error_name = driver if driver is not None else (None, None)
        self.pdl = bool(pdl) and self._launch_ex is not None
        self._attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)

    def bind(self, kernel: Kernel, block: int, grid: int, params: bytes, pdl=False):
        """go(stream): launch `kernel` on `grid` blocks of `block` threads with a copy of
        the packed `params`."""
        buf = ctypes.create_string_buffer(bytes(params), PARAMS.size)
        if kernel.handle is None or self._launch_ex is None:
            raw, record = kernel.raw, np.frombuffer(buf.raw, PARAMS_DTYPE)[0]

            def go_cupy(stream):
                with stream:
                    raw((grid,), (block,), (record,))
            return go_cupy
        with_pdl = pdl and self.pdl
        config = _LaunchConfig(gridDimX=grid, gridDimY=1, gridDimZ=1, blockDimX=block,
                               blockDimY=1, blockDimZ=1,
                               attrs=ctypes.pointer(self._attr) if with_pdl else None,
                               numAttrs=1 if with_pdl else 0)
        argv = (ctypes.c_void_p * 1)(ctypes.addressof(buf))
        config_ref, fn, launch_ex, fail = ctypes.byref(config), \
            ctypes.c_void_p(kernel.handle), self._launch_ex, self._fail

        def go(stream):
            config.hStream = stream.ptr
            rc = launch_ex(config_ref, fn, argv, None)
            if rc:
                fail(rc, kernel.name)
        go.keep = (config, buf, argv)  # alive as long as the function
        return go

    def _fail(self, rc, name):
        text = ctypes.c_char_p()
        self._error_name(rc, ctypes.byref(text))
        raise QKNormError(f"launch of {name} failed: {(text.value or b'?').decode()} ({rc})")
