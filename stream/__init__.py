"""The wire: event batches, the msgpack codec, ZeroMQ transport and the node runtime."""

from stream.batch import EventBatch, Message, Record
from stream.codec import decode, encode
from stream.errors import FrameError
from stream.node import (
    Emit,
    Node,
    NodeConfig,
    NodeState,
    NodeStats,
    Outcome,
    Processor,
    Producer,
)
from stream.protocol import Heartbeat
from stream.schema import COLUMNS, FEATURE_NAMES, SCHEMA_VERSION, TRUTH_COLUMNS
from stream.transport import (
    CurveKeys,
    Endpoint,
    SocketOptions,
    open_socket,
    recv_message,
    send_message,
)

__all__ = [
    "COLUMNS",
    "FEATURE_NAMES",
    "SCHEMA_VERSION",
    "TRUTH_COLUMNS",
    "CurveKeys",
    "Emit",
    "Endpoint",
    "EventBatch",
    "FrameError",
    "Heartbeat",
    "Message",
    "Node",
    "NodeConfig",
    "NodeState",
    "NodeStats",
    "Outcome",
    "Processor",
    "Producer",
    "Record",
    "SocketOptions",
    "decode",
    "encode",
    "open_socket",
    "recv_message",
    "send_message",
]
