"""The worker's ``__main__``: the parent's script functions share one namespace there,
and code in the worker finds the script's objects by name (src/comfy_env/ipc/mainspace.py).

Each case is what a ProcessPoolExecutor user writes and gets; run as a user's script on
every Python, since it touches pickling."""
from __future__ import annotations

import pytest

from pythons import ALL_PYTHONS, run_script

SCRIPT = r"""
import functools, pickle, sys
import concurrent.futures as cf
import multiprocessing as mp
from comfy_env import IsolatedExecutor

MODEL = None
TABLE = {}
K = 1
LATE = None

def init(scale):
    global MODEL
    MODEL = [i * scale for i in range(3)]
    TABLE["loaded"] = scale                 # changed in place by the initializer

def infer(i):
    return MODEL[i], TABLE.get("loaded")

def init_by_name():
    globals()["LATE"] = "loaded"            # no `global LATE`: the name never travels with init

def read_late():
    return LATE

def with_k(x):
    return x + K

@functools.lru_cache(maxsize=None)
def load(name):
    load.calls = getattr(load, "calls", 0) + 1
    return name.upper()

def uses_load(name):
    return load(name), load.cache_info().hits

@functools.cache
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)

class Checkpoint:
    nbytes = property(lambda self: 0)       # a class with an nbytes descriptor, read by a call
    def __init__(self, w):
        self.w = w

def save_and_load(w):
    back = pickle.loads(pickle.dumps(Checkpoint(w)))    # torch.save / joblib do this
    assert Checkpoint.nbytes is not None
    return type(back).__name__, back.w

def square(x):
    return x * x

def nested_pool():
    # A pool inside the call, forked: its children find the script's function by name.
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as pool:
        return pool.submit(square, 7).result()

def main_module():
    m = sys.modules["__main__"]
    return m.__name__, m.infer is not None, "Worker" in vars(m)

out = []
with IsolatedExecutor(initializer=init, initargs=(10,)) as ex:
    out.append([ex.submit(infer, i).result() for i in range(3)])
    out.append(ex.submit(with_k, 1).result())
    K = 5
    out.append(ex.submit(with_k, 1).result())             # the parent's change still arrives
    out.append(ex.submit(load, "a").result())
    out.append([ex.submit(uses_load, "b").result() for _ in range(3)])
    out.append(ex.submit(functools.partial(load, "c")).result())
    out.append(ex.submit(fib, 90).result())                # exponential without its cache
    out.append(ex.submit(save_and_load, 3).result())
    if sys.platform.startswith("linux"):
        out.append(ex.submit(nested_pool).result())
    out.append(ex.submit(main_module).result())
with IsolatedExecutor(initializer=init_by_name) as ex:
    out.append(ex.submit(read_late).result())
    out.append(ex.submit(save_and_load, 1).result())
    class Checkpoint:                         # redefined, as a notebook re-runs a cell
        def __init__(self, w):
            self.w = w * 100
    def pickled_name(obj):
        back = pickle.loads(pickle.dumps(obj))
        return type(back).__name__, back.w
    out.append(ex.submit(pickled_name, Checkpoint(2)).result())
print(out)
"""

EXPECTED = [[(0, 10), (10, 10), (20, 10)], 2, 6, "A", [("B", 0), ("B", 1), ("B", 2)], "C",
            2880067194370816120, ("Checkpoint", 3), 49, ("__main__", True, False), "loaded",
            ("Checkpoint", 1), ("Checkpoint", 200)]


@ALL_PYTHONS
@pytest.mark.timeout(120)
def test_the_scripts_functions_share_one_main_in_the_worker(pyver, tmp_path):
    proc = run_script(pyver, SCRIPT, cwd=tmp_path, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == repr(EXPECTED), proc.stderr


SLOTS = r'''
import dataclasses
import pickle
import typing
from comfy_env import IsolatedExecutor

class NT(typing.NamedTuple):     # a tuple subclass with empty __slots__, rebuilt by typing
    a: int
    b: str = "x"

def echo(v):
    return v

class P:
    __slots__ = ("x", "y")
    def __init__(self, x, y):
        self.x, self.y = x, y

class Q(P):                      # a subclass with slots of its own
    __slots__ = "z"
    def __init__(self, x, y, z):
        super().__init__(x, y)
        self.z = z

@dataclasses.dataclass(slots=True)
class D:
    a: int
    b: str = "b"

def make(x):
    return P(x, 2), Q(x, 3, 4), D(x)

def total(p, q, d):
    return p.x + p.y + q.x + q.y + q.z + d.a

def in_worker():
    p = P(1, 2)
    return hasattr(p, "__dict__"), pickle.loads(pickle.dumps(p)).y, [k for k in ("x", "y") if k in P.__dict__]

if __name__ == "__main__":
    with IsolatedExecutor() as ex:
        p, q, d = ex.submit(make, 5).result(timeout=60)
        print(type(p) is P, type(q) is Q, type(d) is D, p.x, p.y, q.z, d, hasattr(p, "__dict__"))
        print(ex.submit(total, P(1, 2), Q(1, 2, 3), D(4)).result(timeout=60))
        print(ex.submit(in_worker).result(timeout=60))
        print(ex.submit(echo, NT(1)).result(timeout=60))
'''


@ALL_PYTHONS
@pytest.mark.timeout(120)
def test_script_classes_with_slots_cross_both_ways_and_keep_their_slots(pyver, tmp_path):
    """cloudpickle builds a class it pickles by value and sets ``__slots__`` afterwards,
    which makes no slots: a script class with ``__slots__`` came back from a worker
    with "'P' object has no attribute '__dict__'".  Built with its slots now, in the
    worker too."""
    proc = run_script(pyver, SLOTS, cwd=tmp_path, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "True True True 5 2 4 D(a=5, b='b') False",
        "13",
        "(False, 2, ['x', 'y'])",
        "NT(a=1, b='x')",
    ], proc.stderr
