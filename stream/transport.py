"""Thin typed helpers over pyzmq: endpoints, socket options, sending or receiving messages,
and watching a socket's handshakes.

An endpoint string is ``@url`` to bind or ``>url`` to connect (the CZMQ convention);
a bare URL takes the caller's default. URLs are ``tcp://``, ``ipc://`` or ``inproc://``.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated

import pydantic
import zmq
from zmq.utils.monitor import parse_monitor_message

from stream.batch import Message
from stream.codec import decode, encode

SCHEMES = ("tcp://", "ipc://", "inproc://")


def check_scheme(url: str) -> str:
    """``url`` itself, once its scheme is one of ``SCHEMES`` (else ``ValueError``)."""
    if not url.startswith(SCHEMES):
        msg = f"endpoint {url!r} must start with one of {SCHEMES}"
        raise ValueError(msg)
    return url


def _split(text: str) -> tuple[str, bool | None]:
    """``@url`` -> (url, True), ``>url`` -> (url, False), a bare URL -> (url, None)."""
    if text[:1] in ("@", ">"):
        return text[1:], text[0] == "@"
    return text, None


def check_endpoint(text: str) -> str:
    """``text`` itself, once it is ``@url``, ``>url`` or a URL with a known scheme."""
    check_scheme(_split(text)[0])
    return text


_FROZEN = pydantic.ConfigDict(extra="forbid")


@pydantic.dataclasses.dataclass(frozen=True, slots=True, config=_FROZEN)
class Endpoint:
    """Where a socket binds or connects."""

    url: Annotated[str, pydantic.AfterValidator(check_scheme)]
    bind: bool

    @classmethod
    def parse(cls, text: str, *, bind: bool) -> Endpoint:
        """Read ``@url`` (bind), ``>url`` (connect) or a bare URL (``bind`` decides)."""
        url, prefix_binds = _split(text)
        return cls(url, bind=bind if prefix_binds is None else prefix_binds)

    def __str__(self) -> str:
        return ("@" if self.bind else ">") + self.url


@dataclass(frozen=True, slots=True)
class CurveKeys:
    """CURVE key material (Z85 text) for an encrypted, authenticated socket.

    A socket that binds is a CURVE server with its own key pair; a socket that connects is
    a client with its key pair and the server's public key (``server_public_key``). Which
    client keys a server admits is the ZAP authenticator's business (``deploy.security``).
    """

    public_key: bytes
    secret_key: bytes
    server_public_key: bytes | None = None


NonNegative = Annotated[int, pydantic.Field(ge=0)]


@pydantic.dataclasses.dataclass(frozen=True, slots=True, config=_FROZEN)
class SocketOptions:
    """High-water marks, linger, kernel buffer sizes and optional CURVE security for one
    socket (``kernel_buffer_bytes`` 0: the OS's own, autotuned; ``linger_ms`` -1: forever)."""

    sndhwm: NonNegative = 100
    rcvhwm: NonNegative = 100
    linger_ms: Annotated[int, pydantic.Field(ge=-1)] = 5000
    curve: CurveKeys | None = None
    kernel_buffer_bytes: NonNegative = 0


def open_socket(
    ctx: zmq.Context,
    socket_type: int,
    endpoints: Sequence[Endpoint],
    options: SocketOptions | None = None,
    *,
    prepare: Callable[[zmq.Socket], None] | None = None,
) -> zmq.Socket:
    """A socket of ``socket_type`` with ``options`` set, bound or connected to every endpoint.

    ``prepare`` runs on the socket just before it binds or connects (e.g. to attach a
    monitor that must not miss the first connection).
    """
    options = options or SocketOptions()
    sock = ctx.socket(socket_type)
    sock.setsockopt(zmq.SNDHWM, options.sndhwm)
    sock.setsockopt(zmq.RCVHWM, options.rcvhwm)
    sock.setsockopt(zmq.LINGER, options.linger_ms)
    if options.kernel_buffer_bytes:
        sock.setsockopt(zmq.SNDBUF, options.kernel_buffer_bytes)
        sock.setsockopt(zmq.RCVBUF, options.kernel_buffer_bytes)
    if options.curve is not None:
        try:
            _set_curve(sock, options.curve, endpoints)
        except ValueError:
            sock.close(linger=0)
            raise
    try:
        if prepare is not None:
            prepare(sock)
        for endpoint in endpoints:
            if endpoint.bind:
                sock.bind(endpoint.url)
            else:
                sock.connect(endpoint.url)
    except zmq.ZMQError:
        sock.close(linger=0)
        raise
    return sock


def _set_curve(sock: zmq.Socket, keys: CurveKeys, endpoints: Sequence[Endpoint]) -> None:
    """Make ``sock`` a CURVE server if it binds, a client if it connects (never both)."""
    binds = {endpoint.bind for endpoint in endpoints}
    if len(binds) > 1:
        msg = f"a CURVE socket must only bind or only connect, got {[str(e) for e in endpoints]}"
        raise ValueError(msg)
    sock.curve_publickey = keys.public_key
    sock.curve_secretkey = keys.secret_key
    if binds == {True}:
        sock.curve_server = True
    elif keys.server_public_key is None:
        msg = f"a CURVE client needs the server's public key to connect to {endpoints[0].url}"
        raise ValueError(msg)
    else:
        sock.curve_serverkey = keys.server_public_key


def send_message(sock: zmq.Socket, message: Message, *, timeout_ms: int = -1) -> bool:
    """Send one message; ``False`` if it could not be queued within ``timeout_ms``.

    Frames are sent without copying, so the message's arrays must not be modified
    afterwards. ZeroMQ queues a multipart message atomically: all frames or none.
    """
    sock.setsockopt(zmq.SNDTIMEO, timeout_ms)
    try:
        sock.send_multipart(encode(message), copy=False)
    except zmq.Again:
        return False
    return True


def recv_frames(sock: zmq.Socket, *, timeout_ms: int = -1) -> list[zmq.Frame] | None:
    """The next message's frames, without copying, or ``None`` after ``timeout_ms``."""
    if timeout_ms >= 0 and not sock.poll(timeout_ms, zmq.POLLIN):
        return None
    return sock.recv_multipart(copy=False)


def recv_message(sock: zmq.Socket, *, timeout_ms: int = -1) -> Message | None:
    """Receive and decode one message, or ``None`` after ``timeout_ms``; raises ``FrameError``."""
    frames = recv_frames(sock, timeout_ms=timeout_ms)
    return None if frames is None else decode(frames)


_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_ZAP_DENIED = 400  # the ZAP status code of a refused key (RFC 27)
_watch_ids = itertools.count()


def refusal_reason(event: int, value: int) -> str | None:
    """Why a socket refused a peer's handshake, as a bounded label, or ``None`` if it did not.

    ``"key"``: the ZAP handler refused the peer's (valid) key; ``"mechanism"``: the peer
    speaks another security mechanism (e.g. no CURVE at all); ``"crypto"``: the peer could
    not prove the key it claimed (another stage's public key without its secret, or the
    wrong server key); ``"auth"``: ZAP failed otherwise; ``"protocol"``: any other ZMTP
    error. A handshake cut short by the network (``EVENT_HANDSHAKE_FAILED_NO_DETAIL``) is
    not a refusal.
    """
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "key" if value == _ZAP_DENIED else "auth"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return "mechanism"
        if value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            return "crypto"
        return "protocol"
    return None


class HandshakeWatch:
    """The handshakes a socket completed and refused, read from a libzmq socket monitor.

    Attach it before the socket binds or connects so that no handshake is missed. Only
    libzmq sees some refusals (a peer without CURVE, or one claiming a key it cannot
    prove, is turned away before any ZAP handler is asked), so the monitor is the one
    place that sees them all. Events queue without bound until ``drain`` reads them
    (libzmq would drop monitor events beyond the default high-water mark, and with them
    counts), so drain regularly. Not thread-safe: use it from the socket's thread.
    """

    def __init__(self, sock: zmq.Socket) -> None:
        address = f"inproc://trigfarm-handshakes-{next(_watch_ids)}"
        sock.monitor(address, _HANDSHAKE_EVENTS)
        self._sock = sock
        self._pair = sock.context.socket(zmq.PAIR)
        self._pair.setsockopt(zmq.RCVHWM, 0)
        self._pair.connect(address)

    def poll(self, timeout_ms: int) -> bool:
        """Whether events are waiting, after at most ``timeout_ms``."""
        return bool(self._pair.poll(timeout_ms, zmq.POLLIN))

    def drain(self) -> tuple[int, list[str]]:
        """Read every waiting event: (handshakes completed, a reason per refused peer)."""
        succeeded = 0
        refused: list[str] = []
        while True:
            try:
                frames = self._pair.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return succeeded, refused
            event = parse_monitor_message(frames)
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                succeeded += 1
            reason = refusal_reason(event["event"], event["value"])
            if reason is not None:
                refused.append(reason)

    def close(self) -> None:
        """Stop monitoring; events not yet drained are lost."""
        if not self._sock.closed:  # open_socket closes a socket whose bind failed
            self._sock.disable_monitor()
        self._pair.close(linger=0)


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (for a launcher wiring its nodes;
    another process may take it before it is bound, so binders retry or fail clearly)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
