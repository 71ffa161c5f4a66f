"""Collect the records of one logger in a test (for the executors' worker loggers)."""
from __future__ import annotations

import contextlib
import logging


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def collect_records(name):
    """Yield the list the records of logger ``name`` go to, every level, meanwhile kept
    out of its parents (and of pytest's report: worker output can be thousands of lines).
    Each record's ``threadName`` says which thread handled it."""
    logger = logging.getLogger(name)
    handler = _Collect()
    old = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old[0])
        logger.propagate = old[1]
