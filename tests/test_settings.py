"""comfy_env.settings: every COMFY_ENV_* variable parsed in one place, with one clear error."""
from __future__ import annotations

import pathlib
import re

import pytest

from comfy_env import settings

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "comfy_env"
# Set by comfy_env for its own workers, read there: markers, not settings.
MARKERS = {"COMFY_ENV_ROLE", "COMFY_ENV_PACK", "COMFY_ENV_SHIM"}


def test_defaults():
    cfg = settings.read({})
    for var in settings.VARIABLES:
        assert getattr(cfg, var.field) == var.default, var.name
    assert cfg.inline_bytes == 64 * 1024 and cfg.arena_bytes == 1 << 30 and cfg.cuda_heap == "native"


def test_every_field_has_one_variable():
    fields = [v.field for v in settings.VARIABLES]
    assert sorted(fields) == sorted(settings.Settings.__dataclass_fields__)
    assert len({v.name for v in settings.VARIABLES}) == len(fields)


@pytest.mark.parametrize("name,bad", [
    ("COMFY_ENV_INLINE_BYTES", "64k"), ("COMFY_ENV_INLINE_BYTES", "-1"),
    ("COMFY_ENV_ARENA_BYTES", "lots"), ("COMFY_ENV_ARENA_IDLE_S", "1.5"),
    ("COMFY_ENV_CUDA_HEAP", "device"), ("COMFY_ENV_CUDA_PARENT_HEAP", "native"),
    ("COMFY_ENV_CUDA_ROLL_MIN_IDLE_MIB", "x"),
    ("COMFY_ENV_CUDA_POOL_IMPORT_LIMIT_MIB", "0"), ("COMFY_ENV_CUDA_SMALL_COPY_MIB", "5000"),
    ("COMFY_ENV_CUDA_IMPORT_CACHE_MIB", "-1"), ("COMFY_ENV_CUDA_IMPORT_CACHE_COUNT", "2.5"),
    ("COMFY_ENV_CUDA_IMPORT_CACHE_S", "soon"), ("COMFY_ENV_CUDA_STAGING_CACHE_MIB", "nan"),
    ("COMFY_ENV_INTERRUPT_GRACE", "-3"),
])
def test_a_bad_value_names_the_variable_and_what_is_accepted(name, bad):
    with pytest.raises(settings.SettingsError) as info:
        settings.read({name: bad})
    msg = str(info.value)
    assert msg.startswith(f"{name}={bad!r} is not valid: it must be ")
    assert "unset it for the default" in msg


def test_values_parse():
    cfg = settings.read({"COMFY_ENV_INLINE_BYTES": " 0 ", "COMFY_ENV_CUDA_FORCE_CPU": "1",
                         "COMFY_ENV_CUDA_SMALL_COPY_MIB": "0.5", "COMFY_ENV_PRESTART": "no",
                         "COMFY_ENV_UV": "", "COMFY_ENV_CACHE_DIR": "", "COMFY_ENV_CUDA_HEAP": "staging",
                         "COMFY_ENV_CUDA_PARENT_HEAP": "torch"})
    assert cfg.inline_bytes == 0 and cfg.cuda_force_cpu is True and cfg.cuda_small_copy_mib == 0.5
    assert cfg.prestart is False and cfg.cuda_heap == "staging" and cfg.cuda_parent_heap == "torch"
    assert settings.read({}).cuda_parent_heap == "pool"
    assert cfg.uv == "" and cfg.cache_dir is None      # "" disables uv; an empty cache dir is unset
    assert settings.read({"COMFY_ENV_PRESTART": ""}).prestart is False   # as before: empty is off


def test_no_module_reads_a_setting_from_the_environment_itself():
    pattern = re.compile(r"""(?:environ(?:\.get)?\s*[\(\[]|getenv\()\s*["'](COMFY_ENV_[A-Z_]+)""")
    found = []
    for path in SRC.rglob("*.py"):
        if path.name == "settings.py":
            continue
        for m in pattern.finditer(path.read_text()):
            if m.group(1) not in MARKERS:
                found.append(f"{path.relative_to(SRC)}: {m.group(1)}")
    assert not found, "read these through comfy_env.settings: " + ", ".join(found)


def test_the_docs_table_lists_every_variable():
    doc = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    section = doc.split("## Configuration", 1)[1]
    listed = re.findall(r"^\| `(COMFY_ENV_[A-Z_]+)` \|", section, flags=re.M)
    assert listed == [v.name for v in settings.VARIABLES]


# -- parent -> worker: read once in the parent, sent in the handshake ---------------------

def _worker_settings():
    from comfy_env import settings as s
    from comfy_env.ipc import arrays
    return s.to_wire(s.read()), arrays.INLINE_BYTES


@pytest.mark.timeout(60)
def test_a_bad_value_fails_at_construction_naming_the_variable(monkeypatch):
    from comfy_env import IsolatedExecutor
    monkeypatch.setenv("COMFY_ENV_ARENA_IDLE_S", "soon")
    with pytest.raises(settings.SettingsError, match="COMFY_ENV_ARENA_IDLE_S='soon'"):
        IsolatedExecutor()


@pytest.mark.timeout(60)
def test_workers_get_the_parents_settings_not_their_environments(tmp_path):
    """An env's env_vars set COMFY_ENV_* for the worker's environment; the worker still
    uses the values the parent read (and validated) when the executor was made."""
    import dataclasses
    from comfy_env import IsolatedExecutor
    from comfy_env.envs import resolve_env
    wenv = resolve_env(None)
    wenv = dataclasses.replace(wenv, env_vars={"COMFY_ENV_INLINE_BYTES": "123",
                                               "COMFY_ENV_ARENA_IDLE_S": "7"})
    parent = settings.to_wire(settings.read())
    with IsolatedExecutor(wenv) as ex:
        got, inline = ex.submit(_worker_settings).result(timeout=30)
    assert got == parent
    assert inline == parent["inline_bytes"]


def test_install_refuses_a_dict_of_another_version():
    with pytest.raises(settings.SettingsError, match="same comfy_env"):
        settings.install({"inline_bytes": 1})
