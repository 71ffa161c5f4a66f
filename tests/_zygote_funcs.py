"""Preload modules and worker functions for tests/test_zygote.py."""
import os
import sys


def loaded(name):
    return name in sys.modules


def parent_pid():
    return os.getppid()


def pid():
    return os.getpid()


def is_worker_for_cuda():
    from comfy_env.ipc.calls import in_worker
    return in_worker()
