"""A NumPy stand-in for the CuPy calls of tools/gpu_check.py and tools/gpu_profile.py.

Only for ``dry_run.py``, in a child process under numba-cuda's simulator: never on the
test-suite's own path (it would shadow a real CuPy). Timings through it mean nothing.
"""
import time
from types import SimpleNamespace
import numpy as np

__version__ = "fake"
float16, float32, float64 = np.float16, np.float32, np.float64

class ndarray(np.ndarray):
    device = SimpleNamespace(id=0)

def _w(a):
    return np.asarray(a).view(ndarray)

def asarray(a, dtype=None): return _w(np.asarray(a, dtype=dtype))
def asnumpy(a): return np.asarray(a).view(np.ndarray).copy()
def empty(shape, dtype=np.float64): return _w(np.empty(shape, dtype))
def empty_like(a): return _w(np.empty_like(a))
def zeros(shape, dtype=np.float64): return _w(np.zeros(shape, dtype))
def ones(shape, dtype=np.float64): return _w(np.ones(shape, dtype))
def sqrt(a): return _w(np.sqrt(a))
def maximum(a, b): return _w(np.maximum(a, b))
def stack(a): return _w(np.stack(a))
def copyto(d, s): np.copyto(d, s)

class _Rng:
    def __init__(self, seed): self.r = np.random.default_rng(seed)
    def standard_normal(self, shape, dtype=np.float64): return _w(self.r.standard_normal(shape, dtype=dtype))
random = SimpleNamespace(default_rng=_Rng)

class _Event:
    def record(self): self.t = time.perf_counter()
    def synchronize(self): pass
class _Device:
    def __init__(self, i=0): self.id = 0
    def synchronize(self): pass
    attributes = {"MultiProcessorCount": 2}
    mem_info = (1 << 30, 1 << 31)
class _Pool:
    def free_all_blocks(self): pass
    def total_bytes(self): return 0
_pool = _Pool()
cuda = SimpleNamespace(
    Device=_Device, Event=_Event, get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3,
    get_current_stream=lambda: SimpleNamespace(ptr=0),
    runtime=SimpleNamespace(getDeviceProperties=lambda i: {"name": b"fake"}, runtimeGetVersion=lambda: 0))
def get_default_memory_pool(): return _pool
def RawKernel(code, name):
    return lambda grid, block, args: None
def array_equal(a, b, equal_nan=False): return np.array_equal(a, b, equal_nan=equal_nan)
