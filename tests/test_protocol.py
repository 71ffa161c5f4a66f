"""The wire messages are defined once, in comfy_env/ipc/protocol.py.

On the wire a message is a plain tuple ``(tag, field, ...)`` (no class of ours is
pickled, so it costs what the old tuples cost); in memory it is a named type the
read loops dispatch on.
"""
from __future__ import annotations

import ast
import pathlib
import pickle

import pytest

from comfy_env.ipc import codec, lifetime, planes, protocol  # noqa: F401  (planes: registers them)
from comfy_env.ipc.protocol import (Call, Control, Exit, Hello, Init, InitFailed, Log, PlaneMessage,
                                    Ready, Release, Result)

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "comfy_env"

MESSAGES = [
    Hello({"protocol": 2}), Init({"uid": "u"}), Ready(), InitFailed(), Call(7, ("id", b"k")),
    Call(8), Result(7, True), Log(20, "name", "text", 1.5), Exit(),
    Control([Release(("cpu", "u", 1), 2), PlaneMessage("cuda", ("idle", [1], None))]),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_each_message_travels_as_a_plain_tuple_and_comes_back_typed(msg):
    wire = protocol.to_wire(msg)
    assert type(wire) is tuple and wire[0] == msg.tag
    data = pickle.dumps(wire, 5)
    assert b"comfy_env" not in data          # no class of ours on the wire
    back = protocol.from_wire(pickle.loads(data))
    assert type(back) is type(msg) and back == msg
    if type(msg) is Control:
        assert [type(m) for m in back.messages] == [Release, PlaneMessage]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_a_message_copies_and_pickles_as_itself(msg):
    import copy
    assert copy.copy(msg) == msg and type(copy.deepcopy(msg)) is type(msg)
    assert pickle.loads(pickle.dumps(msg)) == msg
    assert repr(msg).startswith(type(msg).__name__ + "(")


def test_a_frame_carries_the_typed_message():
    fb, chunks = codec.encode_message(Result(3, True), lifetime.Link(lambda m: None), [42])
    frame = codec.decode_envelope(b"".join(bytes(c) for c in chunks), [])
    assert type(frame.envelope) is Result and frame.envelope.call_id == 3 and frame.envelope.ok
    assert codec.decode_part(frame, 0, None) == 42


@pytest.mark.parametrize("wire", [("nope",), ("call",), ("ctl", [("nope", 1)]), (), 5])
def test_a_message_not_defined_here_is_refused(wire):
    with pytest.raises(protocol.UnknownMessage):
        protocol.from_wire(wire)


def test_apply_control_reaches_the_ledger_and_the_plane():
    link = lifetime.Link(lambda m: None, name="t")
    seen = []

    class Probe(codec.Plane):
        name = "probe-plane"

        def on_control(self, link_, payload):
            seen.append((link_, payload))

    codec.register_plane(Probe())
    key = ("probe-plane", lifetime.PROCESS_UID, 1)
    rec = lifetime.LEDGER.add_owned(key, None, None)
    lifetime.LEDGER.lend(rec, link, 2)
    protocol.apply_control(link, [Release(key, 1), PlaneMessage("probe-plane", "hi")])
    assert link.lent[key] == 1 and rec.users == 1
    assert seen == [(link, "hi")]
    protocol.apply_control(link, [Release(key, 1)])
    assert key not in link.lent and lifetime.LEDGER.get(key) is None


# Modules whose messages are comfy_env's frames (the zygote and the ComfyUI side channel
# speak protocols of their own; the CUDA plane's blocks carry their own metadata).
TAGS = {"hello", "init", "ready", "init_failed", "call", "result", "log", "ctl", "exit",
        "release", "plane"}
CHECKED = ["worker.py", "executor", "ipc/codec.py", "ipc/lifetime.py", "ipc/arrays.py",
           "ipc/shm.py", "ipc/planes.py", "ipc/transport.py", "ipc/calls.py"]


def test_no_module_builds_or_matches_a_message_by_its_tag():
    offenders = []
    for name in CHECKED:
        path = SRC / name
        for f in ([path] if path.is_file() else sorted(path.rglob("*.py"))):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Tuple) and node.elts \
                        and isinstance(node.elts[0], ast.Constant) and node.elts[0].value in TAGS:
                    offenders.append(f"{f.relative_to(SRC)}:{node.lineno} builds {node.elts[0].value!r}")
                if isinstance(node, ast.Compare) and any(
                        isinstance(c, ast.Constant) and c.value in TAGS for c in node.comparators):
                    offenders.append(f"{f.relative_to(SRC)}:{node.lineno} compares with a tag")
    assert offenders == []
