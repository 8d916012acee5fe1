"""A ComfyUI server in its own process, as a user starts it: `main.py --cpu --listen 127.0.0.1`.

Every wait is bounded, the server only listens on loopback, and `stop()` ends the
process group it started (the e2e fixtures call it in their finalizers).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@dataclass
class ComfyServer:
    process: subprocess.Popen
    url: str
    log_path: Path

    @classmethod
    def start(
        cls,
        comfyui_dir: Path,
        python: str | Path,
        extra_args: list[str],
        log_path: Path,
        ready_timeout: float = 300.0,
    ) -> ComfyServer:
        """Start `python main.py --cpu --listen 127.0.0.1 --port <free> *extra_args` and wait for its API."""
        port = free_port()
        command = [str(python), "main.py", "--cpu", "--listen", LOOPBACK, "--port", str(port), *extra_args]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w", encoding="utf-8") as log:
            log.write(f"$ (cd {comfyui_dir} && {' '.join(command)})\n")
            log.flush()
            process = subprocess.Popen(
                command,
                cwd=comfyui_dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group, so stop() reaches its children too
                env={**os.environ, "NO_PROXY": LOOPBACK, "no_proxy": LOOPBACK},
            )
        server = cls(process, f"http://{LOOPBACK}:{port}", log_path)
        try:
            server._wait_ready(ready_timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"ComfyUI exited with code {self.process.returncode} while starting:\n{self.log_tail()}"
                )
            try:
                self.get_json("/system_stats", timeout=5)
                return
            except (OSError, urllib.error.URLError):
                time.sleep(1)
        raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def get_json(self, path: str, timeout: float = 60):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.load(response)

    def get_text(self, path: str, timeout: float = 60) -> str:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return response.read().decode("utf-8", errors="replace")

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the server's process group, SIGKILL it if it is still there after `timeout` s."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        except ProcessLookupError:
            pass
