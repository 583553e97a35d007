"""A real Prometheus server on loopback: scrape configs and a managed ``prometheus`` process."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ScrapeTarget:
    """One metrics endpoint to scrape, with the labels that identify it."""

    job: str
    address: str  # "127.0.0.1:9101"
    labels: tuple[tuple[str, str], ...] = ()


def scrape_config(targets: Sequence[ScrapeTarget], *, interval_s: float = 1.0) -> str:
    """A Prometheus configuration (YAML; JSON is valid YAML) scraping ``targets``."""
    jobs: dict[str, list[dict[str, Any]]] = {}
    for target in targets:
        jobs.setdefault(target.job, []).append(
            {"targets": [target.address], "labels": dict(target.labels)}
        )
    interval = f"{int(interval_s * 1000)}ms"
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {"job_name": job, "static_configs": static} for job, static in jobs.items()
        ],
    }
    return json.dumps(config, indent=2)


class PrometheusServer:
    """Runs the ``prometheus`` binary on 127.0.0.1 with a given configuration.

    Never a system service: the process lives as long as this object's context and
    keeps its data in a temporary directory unless ``data_dir`` is given.
    """

    def __init__(
        self,
        config_text: str,
        *,
        port: int,
        data_dir: str | Path | None = None,
        binary: str = "prometheus",
    ) -> None:
        path = shutil.which(binary)
        if path is None:
            msg = f"{binary!r} is not on PATH; install it with: apt-get install -y prometheus"
            raise FileNotFoundError(msg)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._binary = path
        self._config_text = config_text
        self._tmp = tempfile.TemporaryDirectory(prefix="trigfarm-prom-")
        self._data_dir = Path(data_dir) if data_dir else Path(self._tmp.name) / "data"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> PrometheusServer:
        """Start the server and wait until it reports ready."""
        config_path = Path(self._tmp.name) / "prometheus.yml"
        config_path.write_text(self._config_text)
        log_path = Path(self._tmp.name) / "prometheus.log"
        self._log = log_path.open("wb")
        self._process = subprocess.Popen(
            [
                self._binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={self._data_dir}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                msg = f"prometheus exited with {self._process.returncode}:\n{log_path.read_text()}"
                raise RuntimeError(msg)
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as reply:
                    if reply.status == 200:
                        log.info("prometheus ready at %s", self.url)
                        return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        self.stop()
        msg = f"prometheus did not become ready in {timeout_s} s"
        raise TimeoutError(msg)

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Run an instant PromQL query; returns the ``data.result`` list."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as reply:
            body = json.load(reply)
        if body.get("status") != "success":
            msg = f"query {promql!r} failed: {body}"
            raise RuntimeError(msg)
        return list(body["data"]["result"])

    def query_value(self, promql: str) -> float | None:
        """The single value of an instant query, or ``None`` when it returns nothing."""
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        """Terminate the server and remove its temporary files."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._process is not None:
            self._log.close()
        self._tmp.cleanup()

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
