"""Kernel launches with less host time than CuPy's generic path: cuLaunchKernel (or
cuLaunchKernelEx, for programmatic dependent launch) through ctypes, with the launch
parameters packed once into a buffer (params.PARAMS) and passed by pointer."""
from __future__ import annotations

import ctypes

import numpy as np

from ..errors import QKNormError
from ..params import PARAMS

# The same bytes as a numpy record, for CuPy's own launch (the fallback where libcuda or a
# kernel's function handle cannot be reached): one opaque, 8-byte aligned field.
PARAMS_DTYPE = np.dtype([("raw", np.uint64, (PARAMS.size // 8,))], align=True)


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


class Launcher:
    """Kernel launches through ctypes with one packed parameter buffer: less host time per
    launch than CuPy's generic argument handling. cuLaunchKernelEx takes a launch
    configuration that is built once per launch function, so a launch is a store of the
    stream into it and one foreign call with ready-made ctypes arguments (no argtypes: their
    conversions cost more than the call). Falls back to CuPy's launch where libcuda or a
    kernel's function handle cannot be reached.

    With `pdl`, launches that ask for it carry programmatic stream serialization: the
    kernel may start while the previous kernel of the stream finishes, and must itself
    wait (griddepcontrol.wait) before it touches memory that kernel may write."""

    def __init__(self, pdl=False):
        self.buf = ctypes.create_string_buffer(PARAMS.size)
        self._argv = (ctypes.c_void_p * 1)(ctypes.addressof(self.buf))
        self.pdl = False
        self._launch_ex = None
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            self._launch_ex = lib.cuLaunchKernelEx
            self._error_name = lib.cuGetErrorName
            self._error_name.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        except (OSError, AttributeError):
            self._launch_ex = None
            return
        self._launch_ex.restype = ctypes.c_int
        self._attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
        self.pdl = bool(pdl)

    def handle(self, kernel):
        """The CUfunction of a CuPy RawKernel on the current device, or None."""
        if self._launch_ex is None:
            return None
        try:
            return int(kernel.kernel.ptr)
        except AttributeError:
            return None

    def bind(self, kernel, block, pdl=False, buf=None, grid=None):
        """A function go(grid, stream) that launches `kernel` ((RawKernel, CUfunction or
        None)) with the parameters currently in `buf` (default: the shared one). With
        `grid` fixed, the function is go(stream) and the grid is set once here."""
        raw, fn = kernel
        buf = self.buf if buf is None else buf
        if fn is None:
            def go_cupy(grid_, stream):
                params = np.frombuffer(buf.raw, PARAMS_DTYPE)[0]
                with stream:
                    raw((grid_,), (block,), (params,))
            if grid is None:
                return go_cupy
            return lambda stream: go_cupy(grid, stream)
        fn_ptr, fail = ctypes.c_void_p(fn), self._fail
        argv = self._argv if buf is self.buf else \
            (ctypes.c_void_p * 1)(ctypes.addressof(buf))
        with_pdl = pdl and self.pdl
        config = _LaunchConfig(gridDimX=grid or 1, gridDimY=1, gridDimZ=1, blockDimX=block,
                               blockDimY=1, blockDimZ=1,
                               attrs=ctypes.pointer(self._attr) if with_pdl else None,
                               numAttrs=1 if with_pdl else 0)
        config_ref, launch_ex = ctypes.byref(config), self._launch_ex
        if grid is None:
            def go(grid_, stream):
                config.gridDimX = grid_
                config.hStream = stream.ptr
                rc = launch_ex(config_ref, fn_ptr, argv, None)
                if rc:
                    fail(rc)
        else:
            def go(stream):
                config.hStream = stream.ptr
                rc = launch_ex(config_ref, fn_ptr, argv, None)
                if rc:
                    fail(rc)
        go.keep = (config, buf, argv)  # alive as long as the function
        return go

    def _fail(self, rc):
        name = ctypes.c_char_p()
        self._error_name(rc, ctypes.byref(name))
        raise QKNormError(f"kernel launch failed: {(name.value or b'?').decode()} ({rc})")
