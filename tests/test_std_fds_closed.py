"""A program started with its standard fds closed (a daemon, ``prog >&- 2>&-``) gets
numbers 0-2 back for the socketpair and pipes of its workers; a child's stdin, stdout
and stderr replace those numbers, so the worker read its channel from its own stdout
pipe and never started.  The executor works there as ProcessPoolExecutor does, with
plain workers, workers forked from a zygote (``preload``), and shared-memory results."""
from __future__ import annotations

import subprocess

import pytest

from pythons import ALL_PYTHONS, script_env, user_python

pytestmark = pytest.mark.timeout(180)

SCRIPT = r'''
import sys
from concurrent.futures import ProcessPoolExecutor
import numpy as np
from comfy_env import IsolatedExecutor

def f(x):
    return x + 1

def big(n):
    return np.arange(n)

if __name__ == "__main__":
    out = []
    for name, make in [("ppe", lambda: ProcessPoolExecutor(max_workers=1)),
                       ("plain", lambda: IsolatedExecutor(max_workers=1)),
                       ("preload", lambda: IsolatedExecutor(max_workers=1, preload=["json"]))]:
        try:
            with make() as ex:
                r = ex.submit(f, 41).result(timeout=60)
                if name != "ppe":
                    a = ex.submit(big, 1 << 20).result(timeout=60)   # shared memory, by fd
                    r = (r, int(a[-1]))
            out.append(f"{name}: {r}")
        except BaseException as exc:
            out.append(f"{name}: {type(exc).__name__}: {exc}")
    with open(sys.argv[1], "w") as fh:      # opened last: the closed numbers stay free until now
        fh.write("\n".join(out) + "\n")
'''


@ALL_PYTHONS
@pytest.mark.parametrize("closed", [">&- 2>&-", "<&- >&-", "<&- >&- 2>&-"])
def test_workers_start_when_the_program_runs_with_std_fds_closed(pyver, closed, tmp_path):
    python = user_python(pyver)
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    result = tmp_path / "result.txt"
    proc = subprocess.run(["/bin/sh", "-c", f'exec "$0" "$1" "$2" {closed}', python, str(script), str(result)],
                          cwd=str(tmp_path), env=script_env(), timeout=150,
                          stdin=subprocess.DEVNULL, capture_output=True)
    assert proc.returncode == 0, proc
    assert result.read_text().splitlines() == [
        "ppe: 42", f"plain: (42, {(1 << 20) - 1})", f"preload: (42, {(1 << 20) - 1})"]
