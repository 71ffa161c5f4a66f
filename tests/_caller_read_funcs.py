"""Worker-side functions for test_executor_caller_reads.py."""
import logging
import time


def log_then_return(n, pause=0.002):
    log = logging.getLogger("user.caller_reads")
    for i in range(n):
        log.warning("record %d", i)
        time.sleep(pause)
    return n


def total(arr, pause=0.0):
    """Sum an array that arrived in shared memory; its lease's release (a control
    message) reaches the parent just before the result."""
    time.sleep(pause)
    return float(arr.sum())


def chatter(i, pause=0.0):
    """Print, log and return: every kind of frame a call sends."""
    print("out", i, flush=True)
    logging.getLogger("user.caller_reads").warning("record %d", i)
    time.sleep(pause)
    return i


def touch(path):
    with open(path, "w"):
        pass
    return path
