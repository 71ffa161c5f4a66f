"""Run the real ComfyUI headless for tests and benchmarks, and talk to it over HTTP/websocket.

Where ComfyUI comes from:

- ``COMFYUI_DIR``: a ComfyUI tree (holding ``main.py``), or a directory holding
  ``ComfyUI/`` and ``make-venv.sh`` (like ``../shared/comfyui``).  Default:
  ``<repo>/../shared/comfyui`` when it exists.
- ``COMFYUI_PYTHON``: the interpreter that runs it.  Default: the venv that
  ``make-venv.sh`` builds into ``~/.cache/comfy-env-tests/comfyui-venv-<hash of
  make-venv.sh>`` (built on first use, ~90 s, reused while the script is unchanged;
  ``.ci/run`` builds it up front).  comfy-env's own dependencies are added to it; this
  checkout's ``src`` reaches ComfyUI through ``PYTHONPATH``.

``locate()`` says why not when either is missing, so tests can skip with the reason.
Only the standard library is used here (the test process needs no websocket package).
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import uuid

from procstate import alive  # noqa: F401  (part of this harness's API)

__test__ = False

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(REPO, "src")
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "comfy-env-tests")
# What comfy-env needs at run time that ComfyUI's requirements don't bring (pyproject's
# dependencies minus numpy/filelock, which ComfyUI has).
COMFY_ENV_DEPS = ("cloudpickle>=3.0", "uv>=0.4", "platformdirs>=3")


def _tree(path):
    """(ComfyUI tree, make-venv.sh or None) for a COMFYUI_DIR-like path, or None."""
    if os.path.isfile(os.path.join(path, "main.py")) and os.path.isdir(os.path.join(path, "comfy")):
        script = os.path.join(os.path.dirname(path), "make-venv.sh")
        return path, script if os.path.isfile(script) else None
    inner = os.path.join(path, "ComfyUI")
    if os.path.isfile(os.path.join(inner, "main.py")):
        script = os.path.join(path, "make-venv.sh")
        return inner, script if os.path.isfile(script) else None
    return None


def venv_dir(script):
    with open(script, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    return os.path.join(CACHE, f"comfyui-venv-{digest}")


def ensure_venv(script, log=None):
    """Build (or reuse) the venv of ``make-venv.sh`` and add comfy-env's deps; its python."""
    venv = venv_dir(script)
    py = os.path.join(venv, "bin", "python")
    os.makedirs(CACHE, exist_ok=True)
    subprocess.run(["bash", script, venv], check=True, stdout=log, stderr=subprocess.STDOUT)
    probe = subprocess.run([py, "-c", "import cloudpickle, uv, platformdirs"],
                           capture_output=True)
    if probe.returncode != 0:
        subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        *COMFY_ENV_DEPS], check=True, stdout=log, stderr=subprocess.STDOUT)
    return py


def locate(build=True):
    """(comfyui_tree, python) or (None, reason)."""
    given = os.environ.get("COMFYUI_DIR")
    path = given or os.path.normpath(os.path.join(REPO, "..", "shared", "comfyui"))
    found = _tree(path) if os.path.isdir(path) else None
    if found is None:
        return None, (f"no ComfyUI tree at COMFYUI_DIR={given!r}" if given else
                      f"no ComfyUI tree given (set COMFYUI_DIR; default {path} does not exist)")
    tree, script = found
    py = os.environ.get("COMFYUI_PYTHON")
    if py:
        if not os.access(py, os.X_OK):
            return None, f"COMFYUI_PYTHON={py!r} is not an executable"
        return tree, py
    if script is None:
        return None, f"ComfyUI at {tree} but no COMFYUI_PYTHON and no make-venv.sh next to it"
    if not build and not os.path.exists(os.path.join(venv_dir(script), ".comfyui-venv-done")):
        return None, f"ComfyUI venv not built (run: bash {script} {venv_dir(script)})"
    try:
        return tree, ensure_venv(script)
    except (OSError, subprocess.CalledProcessError) as exc:
        return None, f"could not build ComfyUI's venv with {script}: {exc}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid):
    """PIDs of all live descendants of ``pid`` (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class ComfyUI:
    """One headless ComfyUI process on a free port with ``base_dir`` as --base-directory."""

    def __init__(self, tree, python, base_dir, env=None, log_path=None, args=()):
        self.tree, self.python, self.base_dir = tree, python, base_dir
        self.args = list(args)          # more of ComfyUI's command-line options
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.extra_env = env or {}
        self.log_path = log_path or os.path.join(base_dir, "comfyui.log")
        self.proc = None
        self.ready_at = None

    def start(self, timeout=180, wait=True):
        """Start ComfyUI; with ``wait``, return once it answers ``/system_stats``."""
        os.makedirs(os.path.join(self.base_dir, "custom_nodes"), exist_ok=True)
        env = dict(os.environ)
        env.update(self.extra_env)
        env["PYTHONPATH"] = os.pathsep.join([SRC] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(self.log_path, "wb")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [self.python, os.path.join(self.tree, "main.py"), "--cpu", "--listen", "127.0.0.1",
             "--port", str(self.port), "--base-directory", self.base_dir,
             "--disable-auto-launch", *self.args],
            cwd=self.tree, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        if not wait:
            return self
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats", timeout=1)
                self.ready_at = time.monotonic()
                return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"ComfyUI not ready after {timeout}s:\n{self.log()[-4000:]}")

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, sig=signal.SIGINT, timeout=30):
        """Stop ComfyUI; returns the descendants it had, for a leak check."""
        if self.proc is None:
            return []
        kids = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return kids

    # ---------------------------------------------------------------- HTTP
    def get(self, path, timeout=30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path, body, timeout=30):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                data = r.read()
                return r.status, json.loads(data) if data else None
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def queue(self, prompt, extra_data=None):
        payload = {"prompt": prompt, "client_id": self.client_id}
        if extra_data is not None:
            payload["extra_data"] = extra_data      # e.g. extra_pnginfo: the workflow
        status, body = self.post("/prompt", payload)
        if status != 200:
            raise PromptRejected(status, body)
        return body["prompt_id"]

    def interrupt(self):
        return self.post("/interrupt", {})

    # ------------------------------------------------------------- websocket
    def connect(self):
        return WebSocket("127.0.0.1", self.port, f"/ws?clientId={self.client_id}")

    def run(self, prompt, ws, timeout=120, on_event=None, extra_data=None):
        """Queue ``prompt`` and collect its events until it ends; returns (prompt_id, events).

        The last event is ``execution_success``, ``execution_error`` or
        ``execution_interrupted``.  ``on_event(event)`` sees each event as it arrives.
        """
        pid = self.queue(prompt, extra_data)
        events = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
            if msg is None or not isinstance(msg, dict):
                continue
            data = msg.get("data") or {}
            if data.get("prompt_id") not in (None, pid):
                continue
            if msg.get("type") in ("status",) or ("prompt_id" not in data and msg.get("type") != "progress"):
                continue
            events.append(msg)
            if on_event is not None:
                on_event(msg)
            if msg["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                return pid, events
        raise TimeoutError(f"prompt {pid} did not finish in {timeout}s; events: {events[-5:]}\n"
                           f"{self.log()[-3000:]}")

    def history(self, prompt_id, timeout=10):
        # ComfyUI files the history entry just after it sends execution_success.
        deadline = time.monotonic() + timeout
        while True:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None or time.monotonic() > deadline:
                if entry is None:
                    raise KeyError(f"no history for prompt {prompt_id} after {timeout}s")
                return entry
            time.sleep(0.02)


class PromptRejected(Exception):
    def __init__(self, status, body):
        super().__init__(f"POST /prompt -> {status}: {body}")
        self.status, self.body = status, body


class WebSocket:
    """A minimal RFC 6455 client: text messages in (JSON-decoded), binary skipped.

    Hand-written because the test process must not need a websocket package; it only
    reads ComfyUI's server-sent messages.
    """

    def __init__(self, host, port, path):
        self.sock = socket.create_connection((host, port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise ConnectionError(f"websocket handshake refused: {head[:200]!r}")

    def _read(self, n, deadline):
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self, timeout=10):
        """The next text message (decoded JSON), or None on timeout."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                b0, b1 = self._read(2, deadline)
                opcode, length = b0 & 0x0F, b1 & 0x7F
                if length == 126:
                    length = struct.unpack(">H", self._read(2, deadline))[0]
                elif length == 127:
                    length = struct.unpack(">Q", self._read(8, deadline))[0]
                payload = self._read(length, deadline)
                if opcode == 1:
                    return json.loads(payload)
                if opcode == 8:
                    raise ConnectionError("websocket closed by server")
                if opcode == 9:             # ping -> pong (masked, as a client must)
                    mask = os.urandom(4)
                    body = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
                    self.sock.sendall(bytes([0x8A, 0x80 | len(body)]) + mask + body)
        except (TimeoutError, socket.timeout):
            return None

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def api_node(class_type, **inputs):
    return {"class_type": class_type, "inputs": inputs}


if __name__ == "__main__":
    # .ci/run: ``python tests/comfyui_harness.py --python`` builds (or reuses) the venv
    # and prints its interpreter; build output goes to stderr.
    if sys.argv[1:] != ["--python"]:
        sys.exit("usage: comfyui_harness.py --python")
    found = _tree(os.environ.get("COMFYUI_DIR") or os.path.join(REPO, "..", "shared", "comfyui"))
    if found is None or found[1] is None:
        sys.exit("comfyui_harness: no ComfyUI tree with make-venv.sh (set COMFYUI_DIR)")
    print(ensure_venv(found[1], log=sys.stderr))
