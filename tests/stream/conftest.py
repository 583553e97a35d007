from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import zmq

from stream import Node


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@contextmanager
def running(node: Node, timeout_s: float = 10.0) -> Iterator[Node]:
    """Run a node in a thread; request a graceful stop on exit and wait for it."""
    thread = threading.Thread(target=node.run, daemon=True)
    thread.start()
    assert node.wait_started(timeout_s), "node did not start"
    try:
        yield node
    finally:
        node.request_stop()
        thread.join(timeout_s)
        assert not thread.is_alive(), "node did not stop"
