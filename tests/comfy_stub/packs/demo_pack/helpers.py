def invert(image, strength):
    return 1.0 - image * strength


class DemoNodeError(RuntimeError):
    """Defined only in the pack: importable in the worker, not by the host."""
