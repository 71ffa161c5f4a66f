"""Preload modules and worker functions for tests/test_zygote.py."""
import os
import sys


def loaded(name):
    return name in sys.modules


def parent_pid():
    return os.getppid()


def pid():
    return os.getpid()
