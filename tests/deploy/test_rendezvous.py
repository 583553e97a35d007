"""``trigfarm rendezvous``: the averaging store as a process of its own (the Kubernetes
rendezvous pod), used by real store clients and stopped by SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
from datetime import timedelta

import pytest
from torch.distributed import TCPStore

from stream.transport import free_tcp_port


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_the_rendezvous_serves_a_store_until_sigterm() -> None:
    port = free_tcp_port()
    command = [sys.executable, "-m", "deploy", "rendezvous", "--listen", f"tcp://127.0.0.1:{port}"]
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True) as process:
        try:
            assert process.stderr is not None
            line = process.stderr.readline().strip()
            assert line == f"averaging store at tcp://127.0.0.1:{port}"
            client = TCPStore("127.0.0.1", port, None, False, timedelta(seconds=10))
            client.set("current", "3")
            assert client.get("current") == b"3"
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=20) == 0
        finally:
            process.kill()


@pytest.mark.slow
def test_a_bad_address_is_one_line_and_a_non_zero_exit() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deploy", "rendezvous", "--listen", "udp://host:1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "Error: cannot host the averaging store at udp://host:1: init_method must look like "
        "tcp://host:port, got 'udp://host:1'"
    ]
