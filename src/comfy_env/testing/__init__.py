"""comfy_env's pytest plugin: a test body in a worker process, in any environment.

``plugin`` holds the pytest hooks (loaded through the ``pytest11`` entry point
named ``comfy_env``), ``executors`` the per-session workers and the environment
each test runs in, ``worker_side`` what a worker runs for one test.  The parent
turns a test item into one executor call, and the call's outcome (or its
``CallTimeout`` / ``WorkerCrashed``) back into a test report.  See docs/testing.md.
"""
