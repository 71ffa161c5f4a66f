"""By-value functions (``__main__``, closures, lambdas) are sent once per worker.

The worker keeps them by the hash of their pickled bytes; the parent pickles
again unless a fingerprint proves the bytes would not change.  What matters
most is that no call ever runs stale code: redefined functions, closures over
changed values, per-call lambdas, changed globals and defaults all run as the
parent sees them now.  See src/comfy_env/fncache.py.
"""
from __future__ import annotations

import sys
import textwrap
import threading
import time

import pytest

import _funcs
from comfy_env import IsolatedExecutor, fncache
from comfy_env.executor.worker_handle import WorkerHandle
from comfy_env.ipc import codec
from pythons import ALL_PYTHONS, run_script

BIG = 100_000       # a string constant of this size makes a function's bytes easy to see


def main_fns(src, **glb):
    """Functions defined as in a user's script: module ``__main__``, so pickled by value."""
    ns = {"__name__": "__main__", **glb}
    exec(textwrap.dedent(src), ns)
    return ns


def big_fn(name, tag):
    return main_fns(f"def {name}(x):\n    s = {('%s' % tag) * BIG!r}\n    return (x, s[:1])\n")[name]


@pytest.fixture
def sent_bytes(monkeypatch):
    """Bytes of each call frame sent to a worker, in order."""
    sizes = []
    orig = WorkerHandle.send_call

    def send_call(self, item, chunks, fds, *books):
        sizes.append(sum(memoryview(c).nbytes for c in chunks))
        return orig(self, item, chunks, fds, *books)

    monkeypatch.setattr(WorkerHandle, "send_call", send_call)
    return sizes


ENVS = pytest.mark.parametrize("env", ["current", "foreign"])


def make(env, **kw):
    # The same interpreter named by path is a "foreign" env: functions it cannot
    # import go through _pickle_by_value's route.
    return IsolatedExecutor(None if env == "current" else sys.executable, **kw)


@ENVS
@pytest.mark.timeout(60)
def test_a_main_function_is_sent_once_per_worker(env, sent_bytes):
    f = big_fn("f", "a")
    with make(env) as ex:
        assert [ex.submit(f, i).result() for i in range(5)] == [(i, "a") for i in range(5)]
    assert sent_bytes[0] > BIG
    assert all(n < 4000 for n in sent_bytes[1:]), sent_bytes


@ENVS
@pytest.mark.timeout(60)
def test_a_main_function_is_pickled_once_while_nothing_it_uses_changed(env, monkeypatch):
    pickles = []
    orig = codec.dumps_portable

    def counting(obj):
        pickles.append(obj)
        return orig(obj)

    monkeypatch.setattr(codec, "dumps_portable", counting)
    ns = main_fns("""
        K = 3
        def f(x):
            return x + K
    """)
    with make(env) as ex:
        assert [ex.submit(ns["f"], i).result() for i in range(10)] == [i + 3 for i in range(10)]
        assert len(pickles) == 1
        ns["K"] = 4
        assert ex.submit(ns["f"], 1).result() == 5
        assert len(pickles) == 2


@pytest.mark.timeout(60)
def test_lru_eviction_resends_what_the_worker_dropped(monkeypatch, sent_bytes):
    monkeypatch.setattr(fncache, "MAX_ENTRIES", 2)
    f1, f2, f3 = big_fn("f1", "a"), big_fn("f2", "b"), big_fn("f3", "c")
    with IsolatedExecutor() as ex:
        order = [f1, f2, f1, f3, f1, f2, f3, f3]
        assert [ex.submit(f, 0).result() for f in order] == [f(0) for f in order]
    # f1 f2 new; f1 held; f3 evicts f2 (least recently used); f1 held; f2 and f3 re-sent.
    assert [n > BIG for n in sent_bytes] == [True, True, False, True, False, True, True, False]


@pytest.mark.timeout(60)
def test_the_byte_budget_evicts_too(monkeypatch, sent_bytes):
    monkeypatch.setattr(fncache, "MAX_BYTES", int(BIG * 1.5))
    f1, f2 = big_fn("f1", "a"), big_fn("f2", "b")
    with IsolatedExecutor() as ex:
        order = [f1, f1, f2, f1, f1]
        assert [ex.submit(f, 0).result() for f in order] == [f(0) for f in order]
    assert [n > BIG for n in sent_bytes] == [True, False, True, True, False]


@pytest.mark.timeout(120)
def test_a_call_is_never_planned_from_books_that_lack_the_one_just_sent(monkeypatch):
    """The worker's books (what it holds) are updated before the frame goes out.  Once it
    is out, the worker may answer, and another thread plan the next call for it, before
    the sending thread runs again.  A sender held up right after sending (a sleep here,
    a preemption in real life) left that plan made from stale books: two calls evicted
    the same function (KeyError in submit(), for a call that ran anyway), or one referred
    to a function the worker had already dropped."""
    monkeypatch.setattr(fncache, "MAX_ENTRIES", 4)      # evictions from the 5th function
    real = WorkerHandle.send_call

    def held_up_after_sending(self, *args, **kwargs):
        real(self, *args, **kwargs)
        if threading.current_thread().name.startswith("submitter"):
            time.sleep(0.02)

    monkeypatch.setattr(WorkerHandle, "send_call", held_up_after_sending)

    def make(v):
        def f():
            return v        # a closure: by value, a new function (and key) per value
        return f

    submitted, errors = [], []
    with IsolatedExecutor(max_workers=1) as ex:
        assert ex.submit(make(-1)).result(timeout=30) == -1

        def submit_many(k):
            for i in range(20):
                v = k * 100 + i
                try:
                    submitted.append((v, ex.submit(make(v))))
                except Exception as exc:
                    errors.append(exc)
                time.sleep(0.001)

        threads = [threading.Thread(target=submit_many, args=(k,), name=f"submitter{k}")
                   for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        results = [(v, f.result(timeout=60)) for v, f in submitted]
    assert errors == []
    assert len(results) == 40 and all(v == r for v, r in results)


@pytest.mark.timeout(60)
def test_a_restarted_worker_starts_empty_and_gets_the_function_again(sent_bytes):
    f = big_fn("f", "a")
    with IsolatedExecutor() as ex:
        assert ex.submit(f, 1).result() == (1, "a")
        assert ex.submit(f, 2).result() == (2, "a")
        with pytest.raises(Exception):
            ex.submit(_funcs.kill_self).result()
        assert ex.submit(f, 3).result() == (3, "a")
        assert ex.submit(f, 4).result() == (4, "a")
    big = [n > BIG for n in sent_bytes]
    assert big == [True, False, False, True, False], sent_bytes


@pytest.mark.timeout(60)
def test_arguments_that_fail_to_decode_leave_the_function_held(sent_bytes):
    f = big_fn("f", "a")
    with IsolatedExecutor() as ex:
        with pytest.raises(Exception, match="refuses to be rebuilt"):
            ex.submit(f, _funcs.FailsToUnpickle()).result()
        assert ex.submit(f, 1).result() == (1, "a")
    assert sent_bytes[0] > BIG and sent_bytes[1] < 4000


STALE = """
import math, sys
from comfy_env import IsolatedExecutor

ex = IsolatedExecutor()
out = []
run = lambda f, *a: out.append(ex.submit(f, *a).result())

def f(x): return x + 1
run(f, 1)
def f(x): return x + 2                   # same qualname, new code
run(f, 1)

K = 10
def g(x): return x + K
run(g, 1); K = 20; run(g, 1)             # a global it reads changed

def helper(): return "h1"
def uses_helper(): return helper()
run(uses_helper)
def helper(): return "h2"                # a by-value function it calls was redefined
run(uses_helper)

def make():
    v = 1
    def h(x): return x + v
    def set_v(n):
        nonlocal v
        v = n
    return h, set_v
h, set_v = make()
run(h, 1); set_v(5); run(h, 1)           # a closure cell changed

for i in range(3):                       # a lambda made per call, over changing values
    run(lambda x: x * i, 2)
for i in range(3):
    run(lambda x, i=i: x + i, 10)

def d(x, y=1): return x + y
run(d, 1); d.__defaults__ = (7,); run(d, 1)     # defaults replaced
def other(x, y=1): return x - y
d.__code__ = other.__code__; run(d, 1)          # code replaced in place

def sign(): return math.copysign(1, Z)
Z = 0.0; run(sign); Z = -0.0; run(sign)         # equal but not the same float

L = [1]
def length(): return len(L)
run(length); L.append(2); run(length)           # a mutable global: never cached

counter = 0
def bump():
    global counter
    counter += 1
    return counter
run(bump); run(bump)                            # the worker's copy keeps what its calls set
counter = 10; run(bump)                         # the parent's change: its value, afresh

cache = {}
def load_once():
    if "model" not in cache:
        cache["model"] = 0                      # an expensive load, once per worker
    cache["model"] += 1
    return cache["model"]
run(load_once); run(load_once)

K2 = 1
def kf(): return K2
for v in (1, 2, 1):                             # back to a value sent before: its bytes come
    K2 = v                                      # again, and the worker must not keep the 2
    run(kf)

def hh(): return "a"
def uses_hh(): return hh()
run(uses_hh)
def hh(): return "b"
run(uses_hh)
def hh(): return "a"                            # a helper redefined back as it was
run(uses_hh)

from math import sqrt
def root(x): return sqrt(x)                     # a module's builtin function as a global
run(root, 9.0)

print(out)
ex.shutdown()
"""

EXPECTED = [2, 3, 11, 21, "h1", "h2", 2, 6, 0, 2, 4, 10, 11, 12, 2, 8, -6, 1.0, -1.0, 1, 2, 1, 2, 11, 1, 2,
            1, 2, 1, "a", "b", "a", 3.0]


@ALL_PYTHONS
@pytest.mark.timeout(120)
def test_no_call_runs_stale_code(pyver, tmp_path):
    proc = run_script(pyver, STALE, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == repr(EXPECTED), proc.stderr


# -- the fingerprint itself (parent only) -----------------------------------------------
def counted():
    n = []

    def pickle(fn):
        n.append(fn)
        return codec.dumps_portable(fn)
    return n, pickle


def test_fingerprint_repickles_on_every_change_it_must_see():
    n, pickle = counted()
    ns = main_fns("""
        import os
        K = 1
        def helper(): return 1
        def f(x=1):
            return x + K + helper() + len(os.sep)
    """)
    f = ns["f"]
    key = fncache.pickled_once(f, pickle)[1]
    assert fncache.pickled_once(f, pickle)[1] == key and len(n) == 1
    ns["K"] = 2
    k2 = fncache.pickled_once(f, pickle)[1]
    assert len(n) == 2 and k2 != key
    exec("def helper(): return 2", ns)
    assert fncache.pickled_once(f, pickle)[1] != k2 and len(n) == 3
    f.__defaults__ = (5,)
    fncache.pickled_once(f, pickle)
    assert len(n) == 4
    f.__kwdefaults__ = None
    f.__doc__ = "now documented"
    fncache.pickled_once(f, pickle)
    assert len(n) == 5


def test_state_that_can_change_unseen_is_pickled_on_every_call():
    ns = main_fns("""
        L = []
        BIG = list(range(100))
        class C: pass
        def uses_big_list(): return BIG
        def uses_class(): return C
        def rebinds():
            global L
            L = []
        def reads_globals(): return globals()
    """)
    fn = main_fns("def f(): pass")["f"]
    fn.attr = 1
    for f in [ns[name] for name in ("uses_big_list", "uses_class", "rebinds", "reads_globals")] + [fn]:
        n, pickle = counted()
        blob, key = fncache.pickled_once(f, pickle)
        # Keyed by the bytes (a worker holding them is not sent them again), never
        # assumed unchanged: pickled again each time.
        assert fncache.pickled_once(f, pickle) == (blob, key) and len(n) == 2, f.__name__
        assert key == fncache.digest(codec.dumps_portable(f))


def test_small_dicts_lists_and_sets_are_fingerprinted_by_contents_and_identity():
    """A function reading a small mutable global (a cache the worker fills, a config
    dict) is pickled once while that global's contents and identity stay, and again
    on any change in place or rebinding (pickling it on every call cost ~1 ms per call
    with torch imported)."""
    n, pickle = counted()
    ns = main_fns("""
        CACHE = {}
        CONF = {"size": 3, "names": ["a", "b"], "tags": {"x"}}
        def f(k):
            return CACHE.get(k), CONF["size"]
    """)
    f = ns["f"]
    key = fncache.pickled_once(f, pickle)[1]
    for _ in range(3):
        assert fncache.pickled_once(f, pickle)[1] == key
    assert len(n) == 2            # twice, once: another thread may change a container meanwhile
    seen = {key}
    for change in (lambda: ns["CACHE"].__setitem__("k", 1),     # in place, each kind
                   lambda: ns["CONF"]["names"].append("c"),
                   lambda: ns["CONF"]["tags"].add("y"),
                   lambda: ns.__setitem__("CACHE", dict(ns["CACHE"]))):   # equal, another object
        before = len(n)
        change()
        k = fncache.pickled_once(f, pickle)[1]
        assert len(n) == before + 2 and fncache.pickled_once(f, pickle)[1] == k
        assert k == fncache.digest(codec.dumps_portable(f))
        seen.add(k)
    ns["CONF"]["self"] = ns["CONF"]              # a cycle: pickled on every call
    before = len(n)
    fncache.pickled_once(f, pickle)
    fncache.pickled_once(f, pickle)
    assert len(n) == before + 2


def test_bytes_pickled_while_another_thread_changed_a_container_are_not_kept():
    """The fingerprint is read before the pickle: a global changed by another thread in
    between left bytes of the new value cached under the old value's fingerprint, sent
    for as long as the old value stayed."""
    ns = main_fns("""
        D = {"x": 1}
        def f(): return D["x"]
    """)
    f = ns["f"]

    def changing(fn):
        ns["D"]["x"] = 2                  # another thread, between fingerprint and pickle
        return codec.dumps_portable(fn)
    fncache.pickled_once(f, changing)
    ns["D"]["x"] = 1
    assert fncache.pickled_once(f, codec.dumps_portable)[1] == fncache.digest(codec.dumps_portable(f))


def test_module_builtins_are_fingerprinted_and_builtin_methods_pickled_each_call():
    """cloudpickle's by-reference check refuses builtins (TypeError): a script function
    reading ``from math import sqrt`` or ``APP = L.append`` could not be sent at all."""
    n, pickle = counted()
    ns = main_fns("""
        from math import sqrt
        L = []
        APP = L.append
        def f(x): return sqrt(x) + len(L)
        def g(x): APP(x); return len(L)
    """)
    key = fncache.pickled_once(ns["f"], pickle)[1]
    assert fncache.pickled_once(ns["f"], pickle)[1] == key
    assert len(n) == 2                  # f reads a list: pickled twice, once
    before = len(n)
    fncache.pickled_once(ns["g"], pickle)
    fncache.pickled_once(ns["g"], pickle)
    assert len(n) == before + 2         # a bound builtin method pickles its list: every call


def test_recursive_functions_get_a_fingerprint():
    n, pickle = counted()
    ns = main_fns("""
        def fib(k): return k if k < 2 else fib(k - 1) + fib(k - 2)
        def even(k): return k == 0 or odd(k - 1)
        def odd(k): return k != 0 and even(k - 1)
    """)
    for name in ("fib", "even"):
        fncache.pickled_once(ns[name], pickle)
        fncache.pickled_once(ns[name], pickle)
    assert len(n) == 2


INIT = """
import sys
from comfy_env import IsolatedExecutor
from comfy_env.ipc import lifetime

V = "first"
def init():
    import os
    os.environ["COMFY_ENV_TEST_STATE"] = V    # by-value functions do not share globals
def get():
    import os
    return os.environ["COMFY_ENV_TEST_STATE"]
def crash():
    import os
    os._exit(1)

ex = IsolatedExecutor({env}, initializer=init)
out = [ex.submit(get).result()]
V = "second"                    # a restarted worker runs the initializer as it is now
try:
    ex.submit(crash).result()
except Exception:
    pass
out.append(ex.submit(get).result())
print(out)
ex.shutdown()
"""


@ALL_PYTHONS
@pytest.mark.parametrize("env", ["None", "sys.executable"])
@pytest.mark.timeout(120)
def test_a_restarted_worker_runs_the_initializer_as_it_is_now(pyver, env, tmp_path):
    proc = run_script(pyver, INIT.format(env=env), cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == repr(["first", "second"]), proc.stderr


def _fresh_key(fn):
    return fncache.digest(codec.dumps_portable(fn))


def test_the_quick_check_sees_every_change_the_fingerprint_sees(tmp_path, monkeypatch):
    """A function whose state is all atoms, modules and by-name objects skips its
    fingerprint while the very same objects are in place (fncache._Watch): after each
    change below, what is sent must be what pickling the function now gives."""
    mod = tmp_path / "fncache_helper_mod.py"
    mod.write_text("def helper():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import fncache_helper_mod
    ns = main_fns("""
        import math
        import fncache_helper_mod
        from fncache_helper_mod import helper
        K = 1.5
        T = (1, "a", (2.0, None))
        def make():
            v = 10
            def f(x, y=2):
                "doc"
                return x + y + K + v + len(T) + math.floor(1.0) + helper()
            def set_v(n):
                nonlocal v
                v = n
            return f, set_v
        f, set_v = make()
    """)
    f, set_v = ns["f"], ns["set_v"]

    def check(what):
        got = fncache.pickled_once(f, codec.dumps_portable)
        assert got is not None, what
        assert got[1] == _fresh_key(f), f"stale bytes after: {what}"
        assert fncache.pickled_once(f, codec.dumps_portable)[1] == got[1], what

    check("first call")
    assert fncache._pickled[f].watch is not None        # the quick check is in use
    changes = [
        ("a global rebound to an equal float", lambda: ns.__setitem__("K", float("1.5"))),
        ("a global changed", lambda: ns.__setitem__("K", 2.5)),
        ("a tuple global replaced", lambda: ns.__setitem__("T", (1, "a"))),
        ("a closure cell changed", lambda: set_v(11)),
        ("defaults replaced", lambda: setattr(f, "__defaults__", (3,))),
        ("doc changed", lambda: setattr(f, "__doc__", "other doc")),
        ("renamed", lambda: setattr(f, "__name__", "g")),
        ("qualname changed", lambda: setattr(f, "__qualname__", "make.<locals>.g")),
        ("a module global replaced by another module", lambda: ns.__setitem__("math", __import__("cmath"))),
        ("a by-name function no longer importable by name (pickled by value now)",
         lambda: setattr(fncache_helper_mod, "helper", lambda: 2)),
        ("a new module imported", lambda: __import__("fractions")),
        ("a global deleted", lambda: ns.pop("T")),
        ("keyword defaults added", lambda: setattr(f, "__kwdefaults__", {"z": 1})),
        ("annotations added", lambda: f.__annotations__.update(x=int)),
    ]
    for what, change in changes:
        change()
        check(what)
    f.__code__ = main_fns("def mk():\n    v = 0\n    def h(x, y=2):\n        return v - x\n"
                          "    return h\n")["mk"]().__code__
    check("code replaced in place")
    f.attr = 1              # state the fingerprint cannot pin: pickled on every call again
    assert fncache.pickled_once(f, codec.dumps_portable)[1] == _fresh_key(f)
    assert f not in fncache._pickled
