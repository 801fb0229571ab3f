"""Which array module tinylm computes with: NumPy on the CPU, CuPy on a GPU.

Every layer in tinylm is written against an *array module* called ``xp``. NumPy
and CuPy share one API, so the same lines run on either: a layer asks its
inputs which module they live in (``xp = get_array_module(x)``) and calls
``xp.exp``, ``xp.matmul``, ... on it. Nothing else in the layers changes.

This file is the one place that knows about CuPy. It imports CuPy only when
the GPU is asked for, so ``import tinylm`` works on a machine without it.

    set_backend("numpy")   # the default
    set_backend("cupy")    # new models are placed on the GPU (same initial values)
    xp = get_array_module(x)  # the module an existing array belongs to
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np

_BACKENDS = ("numpy", "cupy")
_DEVICES = {"cpu": "numpy", "gpu": "cupy", "numpy": "numpy", "cupy": "cupy"}
_current = "numpy"

INSTALL_HINT = (
    'install CuPy for your CUDA version: pip install -e ".[cuda12]" or pip install -e ".[cuda13]"'
)


def _import_cupy():
    """Import CuPy and check that a CUDA device is present; explain what is missing if not."""
    try:
        import cupy
    except ImportError as err:
        raise RuntimeError(
            f"the GPU was requested but CuPy is not installed; {INSTALL_HINT}"
        ) from err
    try:
        n_devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # CuPy raises its own CUDARuntimeError when no driver is found
        raise RuntimeError(
            f"the GPU was requested but CUDA found no usable device ({err}); "
            "run on a machine with an NVIDIA GPU and driver, or use the CPU"
        ) from err
    if n_devices == 0:
        raise RuntimeError("the GPU was requested but CUDA reports 0 devices; use the CPU")
    return cupy


def backend_name(device: str) -> str:
    """Map a device or backend name ("cpu", "gpu", "numpy", "cupy") to a backend name."""
    if device not in _DEVICES:
        raise ValueError(f"device must be one of 'cpu' or 'gpu', got {device!r}")
    return _DEVICES[device]


def set_backend(name: str) -> None:
    """Choose where new arrays are made: "numpy" (CPU) or "cupy" (GPU); "cpu"/"gpu" also work."""
    global _current
    name = backend_name(name)
    if name == "cupy":
        _import_cupy()
    _current = name


def get_backend() -> str:
    """The current backend's name: "numpy" or "cupy"."""
    return _current


def xp_for(name: str | None = None):
    """The array module of a backend (the current one by default)."""
    name = _current if name is None else backend_name(name)
    return _import_cupy() if name == "cupy" else np


def is_cupy_array(x) -> bool:
    """True for a CuPy array, found without importing CuPy."""
    return type(x).__module__.split(".")[0] == "cupy"


def get_array_module(*arrays):
    """The module (numpy or cupy) that the given arrays live in; numpy when none is on the GPU."""
    for a in arrays:
        if is_cupy_array(a):
            import cupy

            return cupy
    return np


def to_numpy(x) -> np.ndarray:
    """Copy an array to the host as a NumPy array (a no-op view for NumPy input)."""
    return x.get() if is_cupy_array(x) else np.asarray(x)


def to_backend(x, name: str | None = None):
    """Move a NumPy or CuPy array to the given backend (the current one by default)."""
    xp = xp_for(name)
    if xp is np:
        return to_numpy(x)
    return xp.asarray(x)


def keep_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Ask glibc's malloc to keep freed buffers for reuse instead of returning them to the OS.

    Every NumPy expression allocates its result, and a training step makes thousands of
    temporaries of a few MB. By default glibc gives large freed blocks back to the
    operating system (munmap, or trimming the heap), so the next temporary of the same size
    must be faulted in again, page by page. On virtual machines a page fault is expensive
    and this can make elementwise code several times slower than its arithmetic. Raising
    the mmap and trim thresholds keeps those blocks in the process, as a caching allocator
    would (PyTorch and CuPy keep their own). It changes speed only, never results.

    Returns True when the setting was applied (Linux with glibc), False elsewhere.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (e.g. musl): nothing to tune
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's <malloc.h>
    applied = bool(mallopt(M_MMAP_THRESHOLD, limit_bytes)) and bool(
        mallopt(M_TRIM_THRESHOLD, 2 * limit_bytes)
    )
    global _freed_memory_kept
    _freed_memory_kept = _freed_memory_kept or applied
    return applied


# Whether keep_freed_memory() has applied its setting in this process; tinylm.parallel's worker
# processes apply it too when it has (a setting of one process is not inherited by a new one).
_freed_memory_kept = False


# The thread-count functions of the OpenBLAS that NumPy's wheels bundle (scipy-openblas, 64-bit
# integers) and of a system OpenBLAS, in the order they are tried.
_OPENBLAS_THREAD_FUNCTIONS = (
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
)


@functools.lru_cache(maxsize=1)
def _openblas_thread_functions():
    """(get, set) of the OpenBLAS that NumPy uses, or None (another BLAS, or not found); looked
    up once.

    NumPy's wheels ship it in numpy.libs/ next to the package (numpy/.dylibs on macOS); the
    library is already loaded, so opening it again returns the same one, with its one thread pool.
    """
    import ctypes
    from pathlib import Path

    root = Path(np.__file__).resolve().parent
    candidates = [*sorted(root.parent.glob("numpy.libs/*openblas*")),
                  *sorted(root.glob(".dylibs/*openblas*"))]
    for path in candidates:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        for get_name, set_name in _OPENBLAS_THREAD_FUNCTIONS:
            if hasattr(lib, get_name) and hasattr(lib, set_name):
                get, set_ = getattr(lib, get_name), getattr(lib, set_name)
                get.restype, set_.restype = ctypes.c_int, None
                set_.argtypes = [ctypes.c_int]
                return get, set_
    return None


def blas_threads_now() -> int | None:
    """How many threads NumPy's OpenBLAS uses for a matrix product; None when not known."""
    functions = _openblas_thread_functions()
    return None if functions is None else int(functions[0]())


@contextlib.contextmanager
def blas_threads(n: int):
    """Inside the block, NumPy's matrix products use ``n`` threads; the previous count after.

        with blas_threads(1):     # e.g. while two Python threads each step half of a batch
            ...

    OpenBLAS's thread count is one setting of the whole process, so it is changed only for the
    block and restored on the way out (also after an exception). Yields True when it was set,
    False when NumPy's BLAS is not an OpenBLAS this can find (nothing is changed then).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer number of threads, got {n!r}")
    functions = _openblas_thread_functions()
    if functions is None:
        yield False
        return
    get, set_ = functions
    before = int(get())
    set_(int(n))
    try:
        yield True
    finally:
        set_(before)
