"""Functions the benchmarks run in workers; a module of their own so every
executor (ProcessPoolExecutor, loky, comfy_env) imports them by reference."""


def identity(x):
    return x


def nbytes(x):
    return x.nbytes


def crash():
    import os
    os._exit(1)


def import_torch():
    import torch  # noqa: F401
    return 1


def hang():
    import time
    time.sleep(3600)
