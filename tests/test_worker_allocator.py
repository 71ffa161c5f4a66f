"""COMFY_ENV_CUDA_HEAP=native: the worker's torch allocator settings lose their backend."""
import os

import pytest

from comfy_env import IsolatedExecutor
from comfy_env.executor.worker_allocator import allocator_environment

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("conf, expected", [
    ("backend:cudaMallocAsync", ""),
    ("backend:cudaMallocAsync,max_split_size_mb:128", "max_split_size_mb:128"),
    ("garbage_collection_threshold:0.6, backend : cudaMallocAsync", "garbage_collection_threshold:0.6"),
])
def test_native_policy_takes_the_backend_out_and_keeps_the_rest(conf, expected):
    env = {"PYTORCH_CUDA_ALLOC_CONF": conf, "PYTORCH_ALLOC_CONF": conf}
    assert allocator_environment("native", environ=env) == {"PYTORCH_CUDA_ALLOC_CONF": expected,
                                                            "PYTORCH_ALLOC_CONF": expected}


def test_other_policies_and_confs_without_a_backend_change_nothing():
    env = {"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}
    assert allocator_environment("pool", environ=env) == {}
    assert allocator_environment("staging", environ=env) == {}
    assert allocator_environment("native", environ={"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}) == {}
    assert allocator_environment("native", environ={}) == {}
    # The worker's own env_vars come first.
    assert allocator_environment("native", {"PYTORCH_CUDA_ALLOC_CONF": "backend:native"},
                                 environ={"PYTORCH_CUDA_ALLOC_CONF": "x:1"}) == {"PYTORCH_CUDA_ALLOC_CONF": ""}


def _conf():
    import os
    return os.environ.get("PYTORCH_CUDA_ALLOC_CONF")


@pytest.mark.parametrize("preload", [None, ["json"]], ids=["spawned", "forked-from-zygote"])
def test_a_worker_under_the_native_policy_starts_without_the_parents_backend(monkeypatch, preload):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync,max_split_size_mb:128")
    monkeypatch.setenv("COMFY_ENV_CUDA_HEAP", "native")
    with IsolatedExecutor(max_workers=1, preload=preload) as ex:
        assert ex.submit(_conf).result(timeout=60) == "max_split_size_mb:128"
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "backend:cudaMallocAsync,max_split_size_mb:128"
    monkeypatch.delenv("COMFY_ENV_CUDA_HEAP")
    with IsolatedExecutor(max_workers=1) as ex:          # native is the default
        assert ex.submit(_conf).result(timeout=60) == "max_split_size_mb:128"
    monkeypatch.setenv("COMFY_ENV_CUDA_HEAP", "pool")
    with IsolatedExecutor(max_workers=1) as ex:          # pool: the parent's allocator
        assert ex.submit(_conf).result(timeout=60) == "backend:cudaMallocAsync,max_split_size_mb:128"
