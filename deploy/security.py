"""CURVE security for the farm's links: key pairs per stage and a counting authenticator.

Every stage has one key pair (``<stage>.key`` public, ``<stage>.key_secret`` secret, in
pyzmq's certificate format). A node's bound outputs are CURVE servers that admit only the
public key of the stage that reads them; its input connects as a CURVE client with its
own pair and the upstream stage's public key. A peer with any other key is refused by
the ZAP handler (pyzmq's ``ThreadAuthenticator`` asking ``KeyGuard``). A peer without
CURVE, or one claiming a key it cannot prove (another stage's public key without its
secret), is refused inside libzmq before ZAP is asked. The node runtime counts every
refusal, from its outputs' socket monitors, in ``curve_refused_total{node}``
(``stream.node``); ``KeyGuard.refused`` counts the ZAP refusals only.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from stream.transport import CurveKeys

log = logging.getLogger(__name__)


def key_paths(keys_dir: str | Path, stage: str) -> tuple[Path, Path]:
    """The public and secret certificate files of ``stage``."""
    base = Path(keys_dir)
    return base / f"{stage}.key", base / f"{stage}.key_secret"


def generate_keys(
    keys_dir: str | Path, stages: Iterable[str], *, overwrite: bool = False
) -> list[Path]:
    """Write a key pair per stage (secret files readable by the owner only).

    Raises:
        FileExistsError: a key exists and ``overwrite`` is false.
    """
    base = Path(keys_dir)
    base.mkdir(parents=True, exist_ok=True)
    written = []
    for stage in stages:
        public, secret = key_paths(base, stage)
        if not overwrite and (public.exists() or secret.exists()):
            msg = f"{public} exists; pass overwrite to replace the key pair"
            raise FileExistsError(msg)
        made_public, made_secret = zmq.auth.create_certificates(base, stage)
        Path(made_secret).chmod(0o600)
        written += [Path(made_public), Path(made_secret)]
    return written


def load_public(keys_dir: str | Path, stage: str) -> bytes:
    """The Z85 public key of ``stage``."""
    public, _ = key_paths(keys_dir, stage)
    return _load(public)[0]


def load_pair(keys_dir: str | Path, stage: str) -> tuple[bytes, bytes]:
    """The Z85 public and secret keys of ``stage``."""
    _, secret_path = key_paths(keys_dir, stage)
    public, secret = _load(secret_path)
    if secret is None:
        msg = f"{secret_path} holds no secret key"
        raise ValueError(msg)
    return public, secret


def _load(path: Path) -> tuple[bytes, bytes | None]:
    if not path.exists():
        msg = f"CURVE key {path} is missing; create keys with: trigfarm keys --out {path.parent}"
        raise FileNotFoundError(msg)
    return zmq.auth.load_certificate(path)


def node_keys(keys_dir: str | Path, stage: str, upstream: str | None) -> CurveKeys:
    """The key material for a node of ``stage`` reading from ``upstream``."""
    public, secret = load_pair(keys_dir, stage)
    server = load_public(keys_dir, upstream) if upstream else None
    return CurveKeys(public, secret, server)


class KeyGuard:
    """A ZAP credentials provider: admits listed client keys, counts and logs the rest.

    ``refused`` counts the keys this guard refused. It does not move
    ``curve_refused_total``: the node's socket monitor counts these refusals there, along
    with those that never reach ZAP.
    """

    def __init__(self, node: str, allowed: Iterable[bytes]) -> None:
        self.node = node
        self._allowed = frozenset(allowed)
        self._lock = threading.Lock()
        self.refused = 0

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by the authenticator thread with the client's Z85 public key."""
        del domain
        if key in self._allowed:
            return True
        with self._lock:
            self.refused += 1
            first = self.refused == 1
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "%s: refused a CURVE peer with unknown key %s",
            self.node,
            key.decode(errors="replace"),
        )
        return False


def start_authenticator(ctx: zmq.Context, guard: KeyGuard) -> ThreadAuthenticator:
    """Start ZAP on ``ctx`` (before any server socket binds) with ``guard`` deciding."""
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("deploy.security.zap"))
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=guard)
    return auth
