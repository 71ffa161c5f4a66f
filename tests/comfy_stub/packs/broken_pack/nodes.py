import a_dependency_nobody_installed  # noqa: F401  (the worker's env lacks it)

NODE_CLASS_MAPPINGS = {}
