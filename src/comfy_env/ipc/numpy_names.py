"""Reading numpy's own pickles written by the other numpy major version.

The numpy plane (:mod:`.arrays`) sends arrays, scalars, dtypes and ufuncs in a form both
numpy 1 and numpy 2 read.  Other numpy objects still take numpy's own pickle, which names
things one version lacks:

* numpy 2 names its core ``numpy._core.*`` (an exception such as ``UFuncTypeError``, an
  object array's reconstructor); numpy 1 has ``numpy.core.*``, which numpy 2 keeps
  only as deprecated aliases;
* numpy 2 pickles the bool scalar type as ``numpy.bool``, which numpy 1 lacks
  (``numpy.bool_`` in both).

(Random generators are not among them: their pickles differ in the state's layout too,
so the numpy plane describes them itself, as name and state.)

:class:`Unpickler` maps those names when a pickle is loaded here; everything else loads
as pickle does.  Written by hand: pickle's ``find_class`` is the only hook, and no
library maps numpy's names across its major versions.
"""
from __future__ import annotations

import io
import pickle
import sys

from . import mainspace

__all__ = ["Unpickler", "loads", "find_global"]


def _numpy():
    np = sys.modules.get("numpy")
    if np is None:
        try:
            import numpy as np
        except ImportError:
            return None
    return np


def find_global(find, module, name):
    """``find(module, name)`` (pickle's own lookup) for a global named by a numpy pickle,
    through this numpy major version's name for it."""
    np = _numpy()
    if np is None:
        return find(module, name)
    if int(np.__version__.split(".", 1)[0]) < 2:
        if module == "numpy" and name == "bool":
            return np.bool_
        if module == "numpy._core" or module.startswith("numpy._core."):
            module = "numpy.core" + module[len("numpy._core"):]
    elif module == "numpy.core" or module.startswith("numpy.core."):
        module = "numpy._core" + module[len("numpy.core"):]
    try:
        return find(module, name)
    except AttributeError as exc:
        raise AttributeError(
            f"{exc}: the message holds a numpy object this numpy ({np.__version__}, Python "
            f"{sys.version.split()[0]} at {sys.executable}) does not have, pickled by another "
            f"numpy version (a numpy 2 StringDType array, for instance, has no numpy 1 "
            f"equivalent): convert it to plain Python or numpy data, or use the same major "
            f"version of numpy on both sides") from None


class Unpickler(pickle.Unpickler):
    """``pickle.Unpickler`` reading numpy 1's and numpy 2's pickles alike, and, in a
    worker, building the parent's script functions over the worker's ``__main__``
    (:mod:`.mainspace`)."""

    def find_class(self, module, name):
        if module.startswith("numpy"):
            return find_global(super().find_class, module, name)
        if module == "cloudpickle.cloudpickle":
            hook = mainspace.hook_for(name)
            if hook is not None:
                return hook
        return super().find_class(module, name)


def loads(data):
    """``pickle.loads`` through :class:`Unpickler` (cloudpickle's output included)."""
    return Unpickler(io.BytesIO(data)).load()
