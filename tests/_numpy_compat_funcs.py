"""numpy objects of every kind, built the same way by numpy 1 and numpy 2, and a
version-neutral fingerprint of each: what the numpy 1 <-> numpy 2 tests compare.

Runs on both sides: in the test process, in workers of a numpy-1 or numpy-2 env
(pickled by value: foreign envs cannot import this module), and in a numpy-1 parent
script.  Everything numpy-version specific stays out: data comes from the standard
library's ``random`` (same bytes everywhere), fingerprints hold builtins only.
"""
from __future__ import annotations

import hashlib
import random
import sys

__test__ = False

SMALL = 1 << 10      # elements of the base data: arrays of 1-16 KiB (inline route)
BIG = 1 << 16        # 64 Ki elements: >= 64 KiB (the inline threshold) even for 1-byte dtypes

# dtype specs, as numpy 1 and 2 both spell them
DTYPES = [
    "?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "g", "c8", "c16", "G",
    ">i2", ">i8", ">u4", ">f4", ">f8", ">c16", ">M8[ms]", ">U2",           # byte-swapped
    "M8[ns]", "M8[D]", "M8[s]", "m8[us]", "m8[25s]", "m8[h]",
    "S5", "U3", "V12",
]


def structured_dtypes(np):
    return {
        "struct_packed": np.dtype([("x", "f4"), ("y", "i2"), ("tag", "S3")]),
        "struct_aligned": np.dtype([("x", "f4"), ("y", "i2"), ("tag", "S3")], align=True),
        "struct_offsets": np.dtype({"names": ["a", "b"], "formats": ["u1", ">f8"],
                                    "offsets": [16, 0], "itemsize": 32}),
        "struct_nested": np.dtype([("pos", ">f8", (3,)), ("id", "<u4"),
                                   ("inner", [("t", "M8[us]"), ("s", "U2", (2,)), ("g", "f2")]),
                                   ("m", "i2", (2, 2))], align=True),
        "struct_titles": np.dtype({"names": ["a", "b"], "formats": ["i4", "f8"],
                                   "titles": ["Alpha", None]}),
    }


def _bytes(n, seed):
    return random.Random(seed).randbytes(n)


def sample(np, dtype, n, seed=0):
    """``n`` elements of ``dtype`` from seeded random bytes (NaN payloads, NaT included)."""
    dtype = np.dtype(dtype)
    raw = bytearray(_bytes(n * dtype.itemsize, seed))
    if dtype.kind == "b":
        raw = bytearray(b & 1 for b in raw)
    elif dtype.kind == "U":
        step = 4
        for i in range(0, len(raw), step):        # valid code points, either byte order
            cp = 0x20 + int.from_bytes(raw[i:i + 2], "little") % 0xD000
            raw[i:i + step] = cp.to_bytes(step, "big" if dtype.byteorder == ">" else "little")
    a = np.frombuffer(raw, dtype=dtype)          # over a bytearray: writeable, and no copy
    if dtype.names:                                 # (a copy may leave struct padding unset)
        _fix_unicode(a)
    return a


def _fix_unicode(a):
    for name in a.dtype.names:
        sub = a[name]
        if sub.dtype.kind == "U":
            sub[...] = "ab"
        elif sub.dtype.names:
            _fix_unicode(sub)


def cases(big):
    """name -> object: arrays of every dtype and layout, scalars, dtypes, masked arrays."""
    import numpy as np

    n = BIG if big else SMALL
    out = {}
    for spec in DTYPES:
        out[f"dtype {spec}"] = sample(np, spec, n, seed=len(out))
    for name, dt in structured_dtypes(np).items():
        out[name] = sample(np, dt, n if big else 64, seed=len(out))
    base = sample(np, "f8", n * 2, seed=99).reshape(-1, 64)
    layouts = {
        "0-d": base[3, 5].copy().reshape(()),
        "empty": base[:0],
        "empty 2-d": base[:, :0],
        "slice": base[::2],
        "negative strides": base[::-1, ::-1],
        "transposed": base.T,
        "F-order": np.asfortranarray(base),
        "2-d sliced": base[1:, 3:60:2],
        "reshaped column": base[:, 7:8],
        "read-only": base.copy(),
        "read-only view": base[::-2],
    }
    for k in ("read-only", "read-only view"):
        layouts[k].flags.writeable = False
    for k, v in layouts.items():
        out[f"layout {k}"] = v
    out["byte-swapped F-order view"] = np.asfortranarray(sample(np, ">c8", n * 2, 5).reshape(-1, 32))[::2]
    out["0-d big-endian datetime"] = np.array(sample(np, ">M8[ns]", 1, 6)[0])
    out["recarray"] = np.rec.array(sample(np, structured_dtypes(np)["struct_packed"], n, 7))
    out["matrix"] = np.asmatrix(sample(np, "i4", n, 8).reshape(-1, 4))
    data = sample(np, "f8", n, 9)
    mask = sample(np, "?", n, 10)
    out["masked"] = np.ma.masked_array(data, mask=mask, fill_value=np.frombuffer(_bytes(8, 11), "f8")[0])
    out["masked hard, no mask"] = np.ma.masked_array(sample(np, ">i4", n, 12), hard_mask=True)
    sdt = structured_dtypes(np)["struct_aligned"]
    ms = np.ma.masked_array(sample(np, sdt, n if big else 64, 13),
                            mask=np.zeros(n if big else 64, np.ma.make_mask_descr(sdt)))
    ms._fill_value = sample(np, sdt, 1, 15).reshape(())   # numpy's default leaves padding unset
    out["masked structured"] = ms
    out["masked F-order 2-d"] = np.ma.masked_array(np.asfortranarray(data.reshape(-1, 8)),
                                                   mask=mask.reshape(-1, 8))
    # scalars and dtypes inside a payload (a demanding user returns arr.sum(), arr.dtype)
    nan = np.frombuffer(b"\x01\x00\x00\x00\x00\x00\xf8\x7f", "<f8")[0]     # a NaN with payload
    out["scalars"] = [np.float32(1.5), nan, np.float16(-0.0), np.int64(-3), np.uint8(200),
                      np.bool_(True), np.complex64(1 - 2j), sample(np, "g", 1, 16)[0],
                      np.datetime64("2020-02-29T12:00:00.123456789", "ns"), np.timedelta64(-7, "us"),
                      np.datetime64("NaT", "ns"), np.str_("hé"), np.bytes_(b"x\x00y"), np.int8(-1),
                      sample(np, structured_dtypes(np)["struct_nested"], 1, 14)[0],
                      out["recarray"][0], np.arange(10, dtype="f4").sum(), sample(np, "G", 1, 17)[0]]
    out["dtype objects"] = [np.dtype(s) for s in DTYPES] + list(structured_dtypes(np).values()) + [
        np.dtype(("f4", (2, 3))), np.dtype("f8", metadata={"unit": "m"}), out["recarray"].dtype,
        np.dtype("O")]
    out["ufuncs and dtype classes"] = [np.add, np.sin, np.matmul, np.isnat,
                                       type(np.dtype("f8")), type(np.dtype(">M8[s]"))]
    return out


def object_array(big):
    """Object arrays keep numpy's own pickle (their elements are Python objects)."""
    import numpy as np

    return np.array([1, "two", (3,), None, 2.5] * ((BIG if big else SMALL) // 5), dtype=object)


def _dfp(dtype):
    """A dtype as builtins: everything that makes two dtypes the same one."""
    fields = None
    if dtype.names is not None:
        fields = [(n,) + (_dfp(dtype.fields[n][0]),) + tuple(dtype.fields[n][1:])
                  for n in dtype.names]
    sub = None
    if dtype.subdtype is not None:
        sub = (_dfp(dtype.subdtype[0]), dtype.subdtype[1])
    return (dtype.str, dtype.char,
            dtype.itemsize, dtype.alignment, bool(dtype.isalignedstruct), dtype.byteorder,
            fields, sub, dict(dtype.metadata) if dtype.metadata else None,
            dtype.type.__name__ == "record")


def _raw(np, a):
    """The bytes of ``a``'s elements in C order, exactly as they lie (NaN payloads kept)."""
    if a.dtype.hasobject:
        return repr(a.tolist())
    if a.size == 0:
        return b""
    c = a if a.flags.c_contiguous else np.ascontiguousarray(a)
    return hashlib.sha256(c.reshape(-1).view(np.uint8)).hexdigest()


def fp(x):
    """A version-neutral fingerprint of ``x`` (recursing into lists and dicts)."""
    import numpy as np

    if isinstance(x, dict):
        return {k: fp(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [fp(v) for v in x]
    if isinstance(x, np.ma.MaskedArray):
        m = x._mask
        return ("masked", fp(x.data), None if m is np.ma.nomask else fp(m),
                None if x._fill_value is None else fp(x._fill_value), bool(x._hardmask))
    if isinstance(x, np.ndarray):
        kind = {np.recarray: "recarray", np.matrix: "matrix"}.get(type(x), type(x).__name__)
        return ("array", kind, _dfp(x.dtype), x.shape, x.strides, bool(x.flags.c_contiguous),
                bool(x.flags.f_contiguous), bool(x.flags.writeable), _raw(np, x))
    if isinstance(x, np.generic):
        return ("scalar", type(x) is x.dtype.type, _dfp(x.dtype), x.tobytes())
    if isinstance(x, np.dtype):
        return ("dtype", _dfp(x))
    if isinstance(x, np.ufunc):
        return ("ufunc", x.__name__, x is getattr(np, x.__name__))
    if isinstance(x, type):
        return ("class", x.__module__, x.__qualname__)
    return ("other", type(x).__name__, repr(x))


def expected(x, big):
    """The fingerprint ``x`` should arrive with: on the shared-memory route as sent; inline,
    compacted (C order, F kept for F-contiguous arrays) with its writeable flag."""
    import numpy as np

    if isinstance(x, dict):
        return {k: expected(v, big) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [expected(v, big) for v in x]
    if isinstance(x, np.ma.MaskedArray):
        m = x._mask
        return ("masked", expected(x.data, big), None if m is np.ma.nomask else expected(m, big),
                None if x._fill_value is None else expected(x._fill_value, big), bool(x._hardmask))
    if isinstance(x, np.ndarray) and not x.dtype.hasobject:
        contiguous = x.flags.c_contiguous or x.flags.f_contiguous
        if x.nbytes < INLINE_BYTES:
            compact = not contiguous
        else:                       # a sparse view is compacted (docs/dataplane.md)
            compact = _span(x) > 2 * x.nbytes and not x.flags.f_contiguous
        if compact:
            c = x.copy(order="C")
            c.flags.writeable = x.flags.writeable
            return fp(c)
    return fp(x)


INLINE_BYTES = 64 * 1024


def _span(a):
    """Bytes between the lowest and the highest byte ``a`` touches."""
    if a.size == 0:
        return 0
    lo = sum((n - 1) * s for n, s in zip(a.shape, a.strides) if s < 0)
    hi = sum((n - 1) * s for n, s in zip(a.shape, a.strides) if s > 0)
    return hi - lo + a.itemsize


def fingerprints(obj):
    """Run in a worker: the fingerprint of what arrived, and the numpy shims it loaded."""
    return fp(obj), shims_loaded()


def make_cases(big):
    """Run in a worker: the cases built by this worker's numpy (sent back to the parent)."""
    return cases(big)


def fingerprint_cases(big):
    """Run in a worker: fingerprints of the cases as this numpy builds them (no transfer)."""
    return fp(cases(big))


def echo(x):
    return x


def numpy_version():
    import numpy as np

    return np.__version__


def shims_loaded():
    """Modules that only a pickle written by the *other* numpy major version imports:
    ``numpy.core.*`` in numpy 2 (deprecated aliases), ``numpy._core.*`` in numpy 1."""
    import numpy as np

    shim = "numpy._core" if np.__version__.startswith("1.") else "numpy.core"
    return sorted(m for m in sys.modules if m == shim or m.startswith(shim + "."))


def compare(got, want, label):
    """Failure lines for the cases whose fingerprints differ."""
    out = []
    for k in want:
        if k not in got:
            out.append(f"{label}: {k}: missing")
        elif got[k] != want[k]:
            out.append(f"{label}: {k}: got {_short(got[k])} want {_short(want[k])}")
    return out


def _short(f):
    s = repr(f)
    return s if len(s) < 300 else s[:300] + "..."


def check_round_trips(ex, big, other=None):
    """Everything one executor pair must get right; returns failure lines (empty: all good).

    ``ex`` runs in an env of the other numpy major version than this process.  Arguments
    go there and are fingerprinted by the worker's numpy; the worker's own cases come
    back; an echo goes there and back.  With ``other`` (an executor of this process's
    numpy version), the worker-to-worker chain too: ex's result straight into other.
    """
    import warnings

    fails = []
    shims_before = shims_loaded()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)   # numpy 2 warns on numpy 1's pickles
        mine = cases(big)
        want = expected(mine, big)
        # The two numpys build the same cases (else the comparisons below mean nothing).
        theirs = ex.submit(fingerprint_cases, big).result(120)
        fails += compare(theirs, fp(mine), "cases differ between numpy versions")
        for k in mine:
            try:
                got, shims = ex.submit(fingerprints, mine[k]).result(60)
            except Exception as e:
                fails.append(f"to the worker: {k}: {type(e).__name__}: {e}")
                continue
            fails += compare({k: got}, {k: want[k]}, "to the worker")
            if shims:
                fails.append(f"to the worker: {k}: the worker imported {shims}")
        try:
            back = ex.submit(make_cases, big).result(120)
            fails += compare(fp(back), want, "from the worker")
        except Exception as e:
            fails.append(f"from the worker: {type(e).__name__}: {e}")
        try:
            echoed = ex.submit(echo, mine).result(120)
            fails += compare(fp(echoed), want, "echo")
        except Exception as e:
            fails.append(f"echo: {type(e).__name__}: {e}")
        if other is not None:
            try:
                got, shims = other.submit(fingerprints, ex.submit(make_cases, big)).result(120)
                fails += compare(got, want, "chain worker -> worker")
                if shims:
                    fails.append(f"chain worker -> worker: the receiver imported {shims}")
                got, shims = ex.submit(fingerprints, other.submit(make_cases, big)).result(120)
                fails += compare(got, want, "chain worker <- worker")
                if shims:
                    fails.append(f"chain worker <- worker: the receiver imported {shims}")
            except Exception as e:
                fails.append(f"chain: {type(e).__name__}: {e}")
        shims = sorted(set(shims_loaded()) - set(shims_before))
        if shims:
            fails.append(f"this process imported {shims}")
        # Last (numpy's pickle loads the other version's aliases for good): object arrays
        # cross as numpy pickles them, without warnings.
        obj = object_array(big)
        try:
            got, _shims = ex.submit(fingerprints, obj).result(60)
            fails += compare({"object array": got}, {"object array": fp(obj)}, "to the worker")
            fails += compare({"object array": fp(ex.submit(echo, obj).result(60))},
                             {"object array": fp(obj)}, "echo")
        except Exception as e:
            fails.append(f"object array: {type(e).__name__}: {e}")
    return fails


# -- numpy's own names, random generators, numpy's errors (test_numpy_names_...) -----------
def zeros_of(dtype_type):
    """np.zeros(2, dtype_type): the type object itself crossed (np.bool_ is numpy.bool in
    numpy 2's pickle, which numpy 1 lacks)."""
    import numpy as np
    return np.zeros(2, dtype_type), dtype_type


def bool_type():
    import numpy as np
    return np.bool_


def draws(rng):
    """Eight draws of a Generator / RandomState / bit generator, and the object back."""
    import numpy as np
    if isinstance(rng, np.random.Generator):
        vals = rng.integers(0, 1 << 30, 8)
    elif isinstance(rng, np.random.RandomState):
        vals = rng.randint(0, 1 << 30, 8)
    else:
        vals = rng.random_raw(8)
    return [int(v) for v in vals], rng


def ufunc_type_error():
    import numpy as np
    np.add(np.array(["a"]), 1.5)


def string_dtype_array():
    import numpy as np
    return np.array(["a", "bcd"], dtype=np.dtypes.StringDType())
