"""Device-pinned workers on real GPUs (marker ``gpu``; cross-device cases also ``multigpu``).

Single-GPU: a pinned worker's default device is the pinned GPU (same UUID as the
parent's), and tensors keep their device both ways.  Two or more GPUs: tensors
cross between processes working on different GPUs and arrive on the device they
left (worker -> parent, parent -> worker, worker -> worker).
"""
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import sys  # noqa: E402

import cloudpickle  # noqa: E402

from comfy_env import IsolatedExecutor  # noqa: E402
from comfy_env.ipc.cuda import devices  # noqa: E402

# Worker functions travel by value: importing this module in a worker would need pytest.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.gpu
NGPU = torch.cuda.device_count()
multigpu = pytest.mark.skipif(NGPU < 2, reason="needs two or more CUDA GPUs")


def _uuid_of_current():
    import torch
    from comfy_env.ipc.cuda import devices
    return devices.uuid_of(torch.cuda.current_device())


def _make(n, value):
    import torch
    return torch.full((n,), value, device="cuda", dtype=torch.float32)


def _where_and_sum(t):
    from comfy_env.ipc.cuda import devices
    return devices.uuid_of(t.device.index), float(t.sum())


@pytest.mark.timeout(120)
def test_pinned_worker_runs_on_the_pinned_gpu():
    last = NGPU - 1
    with IsolatedExecutor(device=f"cuda:{last}") as ex:
        assert ex.submit(_uuid_of_current).result() == devices.uuid_of(last)


@pytest.mark.timeout(120)
def test_tensor_keeps_its_device_through_a_pinned_worker():
    with IsolatedExecutor(device="cuda:0") as ex:
        t = ex.submit(_make, 1 << 20, 2.0).result()
        assert t.device == torch.device("cuda:0")
        uuid, total = ex.submit(_where_and_sum, t).result()
        assert uuid == devices.uuid_of(0) and total == 2.0 * (1 << 20)


@multigpu
@pytest.mark.multigpu
@pytest.mark.timeout(180)
def test_worker_to_parent_across_devices():
    with IsolatedExecutor(device="cuda:1") as ex:
        t = ex.submit(_make, 1 << 20, 3.0).result()
        assert t.device == torch.device("cuda:1")
        assert float(t.sum()) == 3.0 * (1 << 20)


@multigpu
@pytest.mark.multigpu
@pytest.mark.timeout(180)
def test_parent_to_worker_across_devices():
    t = torch.full((1 << 20,), 5.0, device="cuda:0")
    with IsolatedExecutor(device="cuda:1") as ex:
        uuid, total = ex.submit(_where_and_sum, t).result()
    assert uuid == devices.uuid_of(0) and total == 5.0 * (1 << 20)


@multigpu
@pytest.mark.multigpu
@pytest.mark.timeout(180)
def test_worker_to_worker_across_devices():
    with IsolatedExecutor(device="cuda:0") as a, IsolatedExecutor(device="cuda:1") as b:
        fa = a.submit(_make, 1 << 20, 7.0)
        uuid, total = b.submit(_where_and_sum, fa).result()
    assert uuid == devices.uuid_of(0) and total == 7.0 * (1 << 20)


def _where_sum_and_current(t):
    import torch
    from comfy_env.ipc.cuda import devices
    return devices.uuid_of(t.device.index) if t.is_cuda else "cpu", float(t.sum()), \
        devices.uuid_of(torch.cuda.current_device())


@pytest.mark.timeout(120)
def test_to_device_asks_for_the_receivers_gpu_or_the_cpu():
    from comfy_env import to_device
    t = torch.full((1 << 20,), 2.0, device="cuda:0")
    with IsolatedExecutor(device="cuda:0") as ex:
        uuid, total, current = ex.submit(_where_sum_and_current, to_device(t)).result()
        assert uuid == current == devices.uuid_of(0) and total == 2.0 * (1 << 20)
        assert ex.submit(_where_sum_and_current, to_device(t, "cpu")).result()[:2] == ("cpu", 2.0 * (1 << 20))
        back = ex.submit(lambda x: __import__("comfy_env").to_device(x + 1, "cuda:0"), t).result()
        assert back.device == torch.device("cuda:0") and float(back[0]) == 3.0


@multigpu
@pytest.mark.multigpu
@pytest.mark.timeout(180)
def test_to_device_moves_across_gpus_to_the_pinned_one():
    from comfy_env import to_device
    t = torch.full((1 << 20,), 4.0, device="cuda:0")
    with IsolatedExecutor(device="cuda:1") as ex:
        uuid, total, current = ex.submit(_where_sum_and_current, to_device(t)).result()
        assert uuid == current == devices.uuid_of(1) and total == 4.0 * (1 << 20)
        # and back onto the parent's cuda:0, named in the worker's numbering by UUID
        back = ex.submit(lambda x, u: __import__("comfy_env").to_device(x * 2, "GPU-" + u), t,
                         devices.uuid_of(0)).result()
        assert back.device == torch.device("cuda:0") and float(back[0]) == 8.0


def _current_device_and_sum(t):
    import torch
    return torch.cuda.current_device(), float(t.sum())


@multigpu
@pytest.mark.multigpu
@pytest.mark.timeout(180)
def test_the_callers_current_device_is_the_same_before_and_after_every_call():
    """Importing or exporting memory of another GPU makes that GPU's context current for
    the driver calls; neither the parent's nor the worker's code may see the switch."""
    on1 = torch.full((1 << 20,), 1.0, device="cuda:1")
    with IsolatedExecutor(device="cuda:1") as pinned, IsolatedExecutor() as both:
        for current in (0, 1):
            torch.cuda.set_device(current)
            back = pinned.submit(_make, 1 << 20, 3.0).result()            # arrives on cuda:1
            assert back.device == torch.device("cuda:1")
            assert torch.cuda.current_device() == current
            # the worker sees both GPUs and starts on its cuda:0: a cuda:1 argument
            # must not move it
            assert both.submit(_current_device_and_sum, on1).result() == (0, float(1 << 20))
            assert torch.cuda.current_device() == current
            with torch.cuda.device(1 - current):
                t = torch.full((1 << 20,), 2.0)
                t = t.to(f"cuda:{1 - current}")
            assert both.submit(_current_device_and_sum, t).result() == (0, 2.0 * (1 << 20))
            assert torch.cuda.current_device() == current
            del back, t
            torch.cuda.empty_cache()                  # the trim hook visits every GPU
            assert torch.cuda.current_device() == current
    torch.cuda.set_device(0)
