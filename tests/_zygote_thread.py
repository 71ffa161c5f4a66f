"""A preload that leaves a thread running (which a fork does not stop)."""
import threading
import time

threading.Thread(target=time.sleep, args=(3600,), name="preload-bg", daemon=True).start()
