"""A node process ends with its own exit code even when a daemon thread is still inside
torch's C++ (an averaging call abandoned on a store that has just closed)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A store client blocked on a daemon thread; its server closes as the process ends, so the
# thread wakes while Python finalizes. Ending through plain SystemExit aborts the process
# ("terminate called without an active exception") in most runs.
_SCRIPT = textwrap.dedent(
    """
    import threading, time
    from datetime import timedelta
    import torch.distributed as dist
    from stream.transport import free_tcp_port
    from deploy.launcher import exit_node_process

    port = free_tcp_port("127.0.0.1")
    server = dist.TCPStore("127.0.0.1", port, None, True, timedelta(seconds=30))
    client = dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=30))

    def blocked():
        try:
            client.get("never-set")
        except Exception:
            pass

    threading.Thread(target=blocked, daemon=True).start()
    time.sleep(0.5)
    del server
    print("books written", flush=True)
    exit_node_process(7)
    """
)


def test_a_node_process_exits_with_its_code_despite_a_thread_blocked_in_torch() -> None:
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", _SCRIPT],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for run in runs:
        stdout, stderr = run.communicate(timeout=120)
        assert run.returncode == 7, stderr[-2000:]
        assert stdout == "books written\n"
        assert "terminate called" not in stderr
