"""Stand-in for comfy.model_management inside isolated workers.

The interrupt API matches ComfyUI's (a per-process flag; throw_... resets it);
comfy-env's side channel sets the flag when the host interrupts.  Device helpers
answer from torch when it is installed in the worker's env.
"""
import threading


class InterruptProcessingException(Exception):
    pass


interrupt_processing_mutex = threading.RLock()
interrupt_processing = False


def interrupt_current_processing(value=True):
    global interrupt_processing
    with interrupt_processing_mutex:
        interrupt_processing = value


def processing_interrupted():
    with interrupt_processing_mutex:
        return interrupt_processing


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    with interrupt_processing_mutex:
        if interrupt_processing:
            interrupt_processing = False
            raise InterruptProcessingException()


def get_torch_device():
    import torch
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def intermediate_device():
    import torch
    return torch.device("cpu")


def unet_offload_device():
    import torch
    return torch.device("cpu")


def soft_empty_cache(force=False):
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def throw_if_interrupted():      # convenience alias some packs use
    throw_exception_if_processing_interrupted()


def __getattr__(name):
    # ComfyUI's OOM_EXCEPTION is torch's out-of-memory error; packs write
    # ``except mm.OOM_EXCEPTION:`` around tiled code.  Looked up lazily: the shim imports
    # no torch until a node needs it (and a worker without torch has plain MemoryError).
    if name == "OOM_EXCEPTION":
        try:
            import torch
            return torch.cuda.OutOfMemoryError
        except (ImportError, AttributeError):
            return MemoryError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r} (comfy-env's stand-in for "
                         f"comfy.model_management in a separate environment has the interrupt API, "
                         f"the device helpers and OOM_EXCEPTION only; run the pack with env=None to "
                         f"use ComfyUI's own)")
