"""Functions that sandboxed test workers import by reference (tests/test_sandbox.py).

A module of their own: importing the test module in a worker would probe bubblewrap
again from inside the sandbox.
"""
from __future__ import annotations

import os
import socket

import numpy as np

__test__ = False


def connect(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    data = s.recv(16)
    s.close()
    return data


def write(path, text="x"):
    with open(path, "w") as f:
        f.write(text)
    return path


def read(path):
    with open(path) as f:
        return f.read()


def echo(x):
    return x


def environ(name):
    return os.environ.get(name)


def fresh_array(n):
    return np.arange(n, dtype=np.float64)


def fresh_tensor(n):
    import torch
    return torch.arange(n, dtype=torch.float32)


def times_two(a):
    return a * 2


def tmp_roundtrip():
    import tempfile
    with tempfile.NamedTemporaryFile("w+", delete=True) as f:
        f.write("scratch")
        f.flush()
        f.seek(0)
        return os.path.dirname(f.name), f.read()


# -- CUDA (run on a GPU machine) ----------------------------------------------------------------

def cuda_make(n):
    import torch
    return (torch.arange(n, device="cuda") % 251).float()


def cuda_sum(t):
    return float(t.double().sum().item()), str(t.device)


def cuda_routes():
    from comfy_env.ipc.cuda.plane import PLANE
    return dict(PLANE.routes)


def cuda_backend():
    import torch
    torch.zeros(1, device="cuda")
    return torch.cuda.get_allocator_backend()
