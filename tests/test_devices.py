"""Pinning workers to a GPU: the worker's CUDA_VISIBLE_DEVICES (no GPU needed for these)."""
import os

import pytest

from comfy_env import IsolatedExecutor
from comfy_env.executor.gpu_pinning import pin_environment
from comfy_env.ipc.gpu_names import parse_device

UUIDS = ["8e7c0aa2" + "0" * 24, "1b2c3d4e" + "f" * 24]


@pytest.mark.parametrize("given, want", [
    (None, None), (0, 0), (3, 3), ("cuda", 0), ("cuda:1", 1), ("2", 2),
    ("GPU-8e7c0aa2-0000-0000-0000-000000000000", "GPU-8e7c0aa2-0000-0000-0000-000000000000"),
])
def test_parse_device_accepts_the_usual_spellings(given, want):
    assert parse_device(given) == want


@pytest.mark.parametrize("bad", ["cpu", "cuda:x", -1, True, 1.5, "gpu0"])
def test_parse_device_refuses_what_is_not_a_gpu(bad):
    with pytest.raises((ValueError, TypeError), match="device"):
        parse_device(bad)


def test_pinned_gpu_comes_first_and_the_others_stay_visible():
    env = pin_environment("cuda:1", environ={}, driver_uuids=UUIDS)
    assert env == {"CUDA_VISIBLE_DEVICES":
                   "GPU-1b2c3d4e-ffff-ffff-ffff-ffffffffffff,GPU-8e7c0aa2-0000-0000-0000-000000000000"}


def test_user_cuda_visible_devices_is_honoured_in_the_parents_numbering():
    # The parent sees physical GPUs 2 and 3 as cuda:0 and cuda:1.
    env = pin_environment("cuda:1", environ={"CUDA_VISIBLE_DEVICES": "2,3"})
    assert env == {"CUDA_VISIBLE_DEVICES": "3,2"}


def test_index_beyond_the_visible_gpus_is_a_clear_error():
    with pytest.raises(ValueError, match="sees 2 GPU"):
        pin_environment(2, environ={"CUDA_VISIBLE_DEVICES": "0,1"})


def test_uuid_prefix_selects_that_gpu():
    env = pin_environment("GPU-1b2c3d4e", environ={}, driver_uuids=UUIDS)
    assert env["CUDA_VISIBLE_DEVICES"].startswith("GPU-1b2c3d4e-ffff")


def _visible():
    import os
    return os.environ.get("CUDA_VISIBLE_DEVICES")


@pytest.mark.timeout(60)
def test_worker_gets_the_pinned_visibility(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    with IsolatedExecutor(device="cuda:2") as ex:
        assert ex.submit(_visible).result() == "6,4,5"


def test_device_without_a_gpu_says_so(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    try:
        from comfy_env.ipc.cuda import devices
        devices.count()
        pytest.skip("a CUDA driver is present here")
    except Exception:
        pass
    with pytest.raises(RuntimeError, match="CUDA driver"):
        IsolatedExecutor(device="cuda:0")


# -- to_device: the call asks for another device than the one the tensor left -----------
def _device_of(t):
    return str(t.device), float(t.sum())


def test_to_device_round_trips_and_leaves_the_tensor_where_it_is_without_cuda():
    torch = pytest.importorskip("torch")
    from comfy_env import to_device
    t = torch.arange(10.0)
    with IsolatedExecutor() as ex:
        assert ex.submit(_device_of, to_device(t, "cpu")).result() == ("cpu", 45.0)
        if not torch.cuda.is_available():        # None: the receiver's own GPU; no GPU: as is
            assert ex.submit(_device_of, to_device(t)).result() == ("cpu", 45.0)
            # nested in a result, and the other way round
            out = ex.submit(lambda x: {"y": __import__("comfy_env").to_device(x * 2, "cpu")}, t).result()
            assert torch.equal(out["y"], t * 2)


def test_to_device_refuses_what_it_cannot_place():
    torch = pytest.importorskip("torch")
    from comfy_env import to_device
    with pytest.raises(TypeError, match="torch tensor"):
        to_device([1, 2, 3])
    with pytest.raises(ValueError, match="full GPU UUID"):
        to_device(torch.ones(1), "GPU-8e7c0aa2")
    with pytest.raises(ValueError, match="MIG"):
        to_device(torch.ones(1), "MIG-8e7c0aa2-0000")
    with pytest.raises(ValueError):
        to_device(torch.ones(1), "tpu:0")
    try:
        from comfy_env.ipc.cuda import devices
        n = devices.count()
    except Exception:
        n = 0
    with pytest.raises(ValueError, match="no such GPU"):
        to_device(torch.ones(1), f"cuda:{n}")
