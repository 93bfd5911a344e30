"""One vaultgate server for the whole session, in front of the mock upstream.

The server is the built binary (`VAULTGATE_BIN`, else `target/debug/vaultgate`)
on a fresh data directory, so it prints its admin and test keys once; the
fixture reads them, stores one provider key per provider through the
management API, and stops the server at the end. When `VAULTGATE_SDK_PIDFILE`
is set, the server's PID is written there so the calling script can stop it
even if pytest itself is killed.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mock_upstream import MockUpstream

REPO = Path(__file__).resolve().parents[2]

# The real provider keys the vault injects; the upstream must see exactly these.
OPENAI_SECRET = "sk-proj-sdktest-openai-0123456789abcdefXYZ"
ANTHROPIC_SECRET = "sk-ant-sdktest-anthropic-0123456789abcdefXYZ"

START_TIMEOUT = 30.0
# Usage and spend reach the store within a second (docs/api.md#usage: batches
# about every 10 ms); allow slack.
USAGE_TIMEOUT = 10.0

# Management calls go straight to 127.0.0.1, never through a proxy from the
# environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _binary() -> Path:
    explicit = os.environ.get("VAULTGATE_BIN")
    if explicit:
        return Path(explicit)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "debug" / "vaultgate"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Gateway:
    """A running vaultgate and the keys it printed."""

    url: str
    admin_key: str
    test_key: str
    upstream: MockUpstream
    stderr_log: Path
    provider_keys: dict[str, str] = field(default_factory=dict)

    def call(self, method: str, path: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict]:
        """One management request; returns (status, JSON body)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {key or self.admin_key}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with _OPENER.open(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def create_key(self, **fields: object) -> dict:
        """Creates a virtual key (admin); the response has `key` and `id`."""
        fields.setdefault("permissions", ["chat:write"])
        status, doc = self.call("POST", "/v1/keys", fields)
        assert status == 201, (status, doc)
        assert doc["key"].startswith("vpx_"), doc
        return doc

    def revoke(self, key_id: str) -> None:
        status, doc = self.call("DELETE", f"/v1/keys/{key_id}")
        assert status == 200, (status, doc)

    def usage(self, key_id: str, expected: int) -> list[dict]:
        """The usage records of one key, once `expected` of them are stored."""
        deadline = time.monotonic() + USAGE_TIMEOUT
        while True:
            status, doc = self.call("GET", f"/v1/usage?key_id={key_id}")
            assert status == 200, (status, doc)
            records = doc["data"]
            if len(records) >= expected or time.monotonic() > deadline:
                return records
            time.sleep(0.1)


def _read_lines(stream, lines: "queue.Queue[str | None]") -> None:
    for raw in stream:
        lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
    lines.put(None)


def _wait_for_keys(proc: subprocess.Popen, lines: "queue.Queue[str | None]", log: Path) -> tuple[str, str]:
    admin = test = None
    deadline = time.monotonic() + START_TIMEOUT
    while admin is None or test is None:
        left = deadline - time.monotonic()
        try:
            line = lines.get(timeout=max(left, 0.01))
        except queue.Empty:
            line = None
        if line is None:
            pytest.fail(f"vaultgate printed no admin and test key (exit {proc.poll()}):\n{log.read_text()}")
        if line.startswith("admin key:"):
            admin = line.split(":", 1)[1].strip()
        elif line.startswith("test key:"):
            test = line.split(":", 1)[1].strip()
    return admin, test


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vaultgate exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with _OPENER.open(url + "/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    pytest.fail(f"vaultgate did not answer /healthz within {START_TIMEOUT}s:\n{log.read_text()}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory):
    binary = _binary()
    if not binary.is_file():
        pytest.fail(f"{binary} is missing: run cargo build -p vault-cli --locked first")
    upstream = MockUpstream().start()
    tmp = tmp_path_factory.mktemp("vaultgate")
    config = tmp / "vaultgate.toml"
    config.write_text(
        f'[providers.openai]\nbase_url = "{upstream.base_url}"\n'
        f'[providers.anthropic]\nbase_url = "{upstream.base_url}"\n'
    )
    data_dir = tmp / "data"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / "vaultgate.stderr.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAULTGATE_")}
    env["VAULTGATE_LOG"] = "warn"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [str(binary), "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir), "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=tmp,
        )
    pidfile = os.environ.get("VAULTGATE_SDK_PIDFILE")
    if pidfile:
        Path(pidfile).write_text(str(proc.pid))
    try:
        lines: "queue.Queue[str | None]" = queue.Queue()
        threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
        admin_key, test_key = _wait_for_keys(proc, lines, log)
        assert admin_key.startswith("vpx_live_"), admin_key
        assert test_key.startswith("vpx_test_"), test_key
        _wait_healthy(proc, url, log)
        gw = Gateway(url=url, admin_key=admin_key, test_key=test_key, upstream=upstream, stderr_log=log)
        for provider, secret in (("openai", OPENAI_SECRET), ("anthropic", ANTHROPIC_SECRET)):
            status, doc = gw.call(
                "POST", "/v1/provider-keys", {"provider": provider, "api_key": secret, "name": f"sdk {provider}"}
            )
            assert status == 201, (status, doc)
            assert doc["id"].startswith("pk_"), doc
            assert secret not in json.dumps(doc), "the provider key came back in a response"
            gw.provider_keys[provider] = doc["id"]
        yield gw
    finally:
        _stop(proc)
        upstream.stop()
