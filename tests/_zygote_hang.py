"""A preload whose import never ends (tests/test_zygote.py)."""
import time

time.sleep(3600)
