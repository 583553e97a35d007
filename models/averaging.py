"""Periodic parameter averaging of torch modules across HLT nodes (local SGD / FedAvg).

Every HLT node trains its own copy of the flows on the events it sees. Every ``every_steps``
optimizer steps the nodes replace their parameters by the weighted mean over all live nodes
(FedAvg: a node's weight is the number of events it learned since the last average), with one
``all_reduce`` over ``torch.distributed``'s gloo backend (TCP), rendezvous on a ``TCPStore``
hosted by rank 0 at ``init_method``. Any parameter vector of a MAF is a valid flow (invertible
by construction, exact log-density), so the mean is always a normalised density; it is also a
*good* one because the copies start from the same weights (average once at step 0, where every
weight is 0 and the nodes count equally) and are averaged every few dozen steps, so they never
leave one basin of the loss and the mean behaves like one flow trained on the union of the
streams. (Averaging independently trained networks would not: permuted hidden units do not
line up.) Only parameters are averaged; buffers and optimizer state stay local.

Failures. A collective waits at most 2/3 of ``timeout_s``: a killed peer fails it at once
(connection closed), a stalled (SIGSTOP) or slow one when the wait runs out. The survivors
then drop the group and re-form it through the store under a new generation ``g``: each
announces itself under ``gen{g}/announce/{rank}``, and waits until every member of the old
group has announced or until ``timeout_s`` after the failed attempt began (at least
``timeout_s / 3`` after its own announcement); the first to stop waiting writes the ranks it
saw with ``compare_set`` under ``gen{g}/members``, which makes that set the one all survivors
adopt. They connect a fresh gloo group on ``PrefixStore(gen{g}/pg/)`` and retry the average
among themselves in the same call. A failed round thus stalls the survivors for about
``timeout_s``, once. A node left out (it came later than the set was written, or was itself
the stalled one and resumed) or left with no peer goes on alone: ``average_`` then returns
``False`` without a collective.

Re-admission. A node that starts while its group is already running (a restarted node: the
store holds the group's ``current`` generation ``g``) announces itself in ``g + 1``, asks to
join (``join/{rank}``) and waits up to ``timeout_s`` in its first ``average_``. The members
see the request at their next round (each adds what it saw to the collective, so all decide
alike; a node alone checks on its own), re-form as ``g + 1`` with it, and it *adopts* their
flow: its first round carries weight 0, since parameters from another trajectory must not be
mixed in. Unanswered, it withdraws and goes on alone. A node that was dropped while it lived
(stalled, then resumed) is not re-admitted: its supervisor restarts it. ``share``/``shared``
keep small values in the store for such newcomers (the learner keeps the agreed
preprocessing there). Every store operation and
group construction runs on a helper thread with a deadline, since a ``TCPStore`` client waits
forever on a stalled store host; a node that cannot reach the store goes on alone as well.

The store. By default rank 0 hosts it, so if rank 0 dies the survivors cannot agree on a
new group and each goes on alone (bounded: the store connection fails at once; if rank 0
is stalled instead, after about ``timeout_s`` + 1 s); rank 0 should close last. With
``store_on_rank0=False`` every rank is a client of an ``AveragingStore`` that another
process hosts (``trigfarm run`` hosts one per averaging stage), and the survivors of any
rank's death, rank 0's included, re-form and go on averaging. All nodes must
make their first call within ``timeout_s`` of each other, and pass modules of the same
architecture, in the same order. The gloo group uses ``torch.distributed``'s own groups
(``ProcessGroupGloo``) on its own stores rather than the process-wide default group, so it
does not interfere with other ``torch.distributed`` use; its interface is chosen as for
``init_process_group`` (the host name, or ``GLOO_SOCKET_IFNAME``).
"""

from __future__ import annotations

import functools
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, TypeVar
from urllib.parse import urlsplit

import pydantic
import torch
from prometheus_client import Counter, Gauge
from pydantic import AfterValidator, ConfigDict, Field, model_validator
from torch.distributed import PrefixStore, ProcessGroupGloo, Store, TCPStore

log = logging.getLogger(__name__)

AVERAGE_ROUNDS = Counter(
    "flow_average_rounds", "Parameter averages completed with the live peers", ["node"]
)
AVERAGE_FAILURES = Counter(
    "flow_average_failures", "Averaging collectives or group connections that failed", ["node"]
)
AVERAGE_LIVE_NODES = Gauge(
    "flow_average_live_nodes", "Nodes in this node's averaging group (itself included)", ["node"]
)

# A failed round may take ``timeout_s`` in all: the collective gets this share of it, the
# survivors' wait for each other at least the remaining third.
_COLLECTIVE_SHARE = 2.0 / 3.0
_MIN_WAIT_SHARE = 1.0 / 3.0
# Extra time granted to helper threads beyond their own deadlines before they are abandoned.
_SLACK_S = 1.0
_POLL_S = 0.02
# Per average_ call: collective attempts, and group re-formations after one.
_MAX_ATTEMPTS = 2
_MAX_REFORMS = 2
_NAMESPACE = "trigfarm/averaging/"
_CURRENT = "current"  # the latest generation a member set was agreed for

_T = TypeVar("_T")


def _tcp_address(address: str) -> str:
    """``address`` if it is ``tcp://host:port`` with a host and a port other than 0."""
    if not address.startswith("tcp://"):
        msg = f"must look like tcp://host:port, got {address!r}"
        raise ValueError(msg)
    try:
        port = urlsplit(address).port
    except ValueError as exc:
        msg = f"{address!r} has an invalid port"
        raise ValueError(msg) from exc
    if not urlsplit(address).hostname or port is None or port == 0:
        msg = f"must name a host and a port, got {address!r}"
        raise ValueError(msg)
    return address


#: The rendezvous store's address and the round timeout (``FlowLearnerConfig`` takes them).
TcpAddress = Annotated[str, AfterValidator(_tcp_address)]
Timeout = Annotated[float, Field(gt=0, allow_inf_nan=False)]


@pydantic.dataclasses.dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class AveragingConfig:
    """Where and how often a node averages.

    Attributes:
        rank: this node's index in [0, world_size).
        world_size: nodes at start.
        init_method: ``tcp://host:port`` of the rendezvous store.
        store_on_rank0: rank 0 hosts the store (listening on ``init_method``); False when
            an ``AveragingStore`` in another process does.
        every_steps: optimizer steps between averages (``maybe_average_``).
        timeout_s: how long a failed round may stall a node, about once per failure.
    """

    rank: int
    world_size: Annotated[int, Field(ge=1)]
    init_method: TcpAddress
    every_steps: Annotated[int, Field(ge=1)] = 50
    timeout_s: Timeout = 10.0
    store_on_rank0: bool = True

    @model_validator(mode="after")
    def _rank_in_world(self) -> AveragingConfig:
        if not 0 <= self.rank < self.world_size:
            msg = f"rank must lie in [0, {self.world_size}), got {self.rank}"
            raise ValueError(msg)
        return self

    @property
    def host(self) -> str:
        """The store's host, from ``init_method``."""
        return urlsplit(self.init_method).hostname or ""

    @property
    def port(self) -> int:
        """The store's port, from ``init_method``."""
        return urlsplit(self.init_method).port or 0


@dataclass(frozen=True, slots=True)
class AveragingStats:
    """A snapshot of one node's averaging counters.

    Attributes:
        rounds: averages completed (the parameters became the mean over the live group).
        failures: collectives or group connections that failed.
        peers_dropped: peers this node stopped averaging with.
        live_world_size: nodes in this node's group, itself included (1 once alone).
        generation: how many times the group was re-formed.
        last_round_s: wall time of the last ``average_`` call that did a collective.
    """

    rounds: int
    failures: int
    peers_dropped: int
    live_world_size: int
    generation: int
    last_round_s: float


class _StalledError(Exception):
    """A helper thread did not finish by its deadline (a stalled store host or peer)."""


def _call_bounded(fn: Callable[[], _T], budget_s: float, what: str) -> _T:
    """``fn()`` on a daemon thread; raises _StalledError if it is not done within budget_s.

    A stalled call is abandoned (its thread stays blocked in C++ with the GIL released); the
    caller must never use what it was working on again.
    """
    result: list[_T] = []
    error: list[Exception] = []

    def run() -> None:
        try:
            result.append(fn())
        except Exception as exc:
            error.append(exc)

    thread = threading.Thread(target=run, name=f"averaging-{what}", daemon=True)
    thread.start()
    thread.join(max(budget_s, 0.0))
    if thread.is_alive():
        msg = f"{what} did not finish within {budget_s:.1f} s"
        raise _StalledError(msg)
    if error:
        raise error[0]
    return result[0]


def _await_listener(host: str, port: int, timeout_s: float) -> None:
    """Wait until something listens at host:port, raising ``ConnectionError`` after
    ``timeout_s``. A store client is made only then: c10d's own connect loop, abandoned
    by ``_call_bounded`` when rank 0 is dead, later corrupted the heap (malloc abort)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                msg = f"nothing listens at {host}:{port} after {timeout_s:.0f} s ({exc})"
                raise ConnectionError(msg) from None
            time.sleep(0.2)


def _host_store(host: str, port: int, timeout: timedelta) -> TCPStore:
    """A ``TCPStore`` server listening on host:port only (TCPStore alone would listen on
    every address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family)
    fd = listener.detach()
    try:
        return TCPStore(
            host, port, None, True, timeout, wait_for_workers=False, master_listen_fd=fd
        )
    except Exception:
        socket.close(fd)
        raise


class AveragingStore:
    """The rendezvous store of a stage's averaging nodes, hosted outside them, so that
    no node's death takes the store with it (``AveragingConfig.store_on_rank0=False``).

    Example:
        >>> with AveragingStore("tcp://127.0.0.1:0") as store:
        ...     store.init_method.startswith("tcp://127.0.0.1:")
        True
    """

    def __init__(self, init_method: str, timeout_s: float = 30.0) -> None:
        address = urlsplit(init_method)
        if address.scheme != "tcp" or not address.hostname or address.port is None:
            msg = f"init_method must look like tcp://host:port, got {init_method!r}"
            raise ValueError(msg)
        self._store: TCPStore | None = _host_store(
            address.hostname, address.port, timedelta(seconds=timeout_s)
        )
        host = f"[{address.hostname}]" if ":" in address.hostname else address.hostname
        self.init_method = f"tcp://{host}:{self._store.port}"

    def close(self) -> None:
        """Stop serving (safe to call more than once)."""
        self._store = None

    def __enter__(self) -> AveragingStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _encode(ranks: Sequence[int]) -> str:
    return ",".join(str(r) for r in sorted(ranks))


def _decode(raw: bytes) -> tuple[int, ...]:
    return tuple(int(r) for r in raw.decode().split(",") if r)


def _agree_members(
    store: Store,
    generation: int,
    rank: int,
    old: tuple[int, ...],
    close_at: float,
    world_size: int,
) -> tuple[int, ...]:
    """Announce ``rank`` in ``generation`` and return the member set all survivors adopt:
    the old members that announced, and any other rank that announced (a joiner)."""
    prefix = f"gen{generation}/"
    members_key = prefix + "members"
    store.set(f"{prefix}announce/{rank}", "1")
    while True:
        if store.check([members_key]):
            return _decode(store.get(members_key))
        announced = [r for r in old if store.check([f"{prefix}announce/{r}"])]
        if len(announced) == len(old) or time.monotonic() >= close_at:
            joiners = [
                r
                for r in range(world_size)
                if r not in old and store.check([f"{prefix}announce/{r}"])
            ]
            # The first writer wins; everyone else reads its set back.
            agreed = store.compare_set(members_key, "", _encode(announced + joiners))
            store.set(_CURRENT, str(generation))
            return _decode(agreed)
        time.sleep(_POLL_S)


def _pending_joins(store: Store, generation: int, outsiders: Sequence[int]) -> int:
    """How many ``outsiders`` ask to join the next generation (``join/{rank}`` holds it)."""
    wanted = str(generation + 1).encode()
    return sum(
        1 for r in outsiders if store.check([f"join/{r}"]) and store.get(f"join/{r}") == wanted
    )


def _await_admission(store: Store, rank: int, deadline: float) -> tuple[int, tuple[int, ...]]:
    """Ask to join the running group and wait for a generation that admits ``rank``:
    ``(generation, members)``, or ``(-1, ())`` once ``deadline`` passes (request withdrawn)."""
    target: int | None = None
    while time.monotonic() < deadline:
        if target is None:  # ask for the generation after the current one
            target = int(store.get(_CURRENT)) + 1
            store.set(f"gen{target}/announce/{rank}", "1")  # announced before asking
            store.set(f"join/{rank}", str(target))
        members_key = f"gen{target}/members"
        if store.check([members_key]):
            members = _decode(store.get(members_key))
            if rank in members:
                return target, members
            target = None  # that generation formed without us: ask for the next
            continue
        time.sleep(_POLL_S)
    store.delete_key(f"join/{rank}")
    if target is not None:  # so that no re-formation counts on a node that gave up
        store.delete_key(f"gen{target}/announce/{rank}")
    return -1, ()


def _connect_group(
    store: Store, generation: int, rank: int, size: int, timeout_s: float
) -> ProcessGroupGloo:
    prefix = PrefixStore(f"gen{generation}/pg/", store)
    return ProcessGroupGloo(prefix, rank, size, timedelta(seconds=timeout_s))


def _parameters(modules: Sequence[torch.nn.Module]) -> list[torch.nn.Parameter]:
    seen: set[int] = set()
    params = []
    for module in modules:
        for param in module.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params


class ParameterAverager:
    """Averages the parameters of torch modules with the other nodes (see the module docstring).

    Joins the group lazily, on the first ``average_``; nothing touches the network before.
    Not thread-safe: call it from the training loop only.
    """

    def __init__(self, config: AveragingConfig, *, node_id: str | None = None) -> None:
        self.config = config
        self.node_id = node_id if node_id is not None else f"rank{config.rank}"
        self._collective_s = config.timeout_s * _COLLECTIVE_SHARE
        self._store: TCPStore | None = None
        self._namespace: Store | None = None
        self._group: ProcessGroupGloo | None = None
        self._members: tuple[int, ...] = tuple(range(config.world_size))
        self._joined = False
        self._alone = False
        self._left = False  # alone for good: it never admits a joiner
        self._adopting = False  # admitted to a running group: its next round takes the mean
        self._joins_asked = 0  # joins the members saw in the last round, summed
        self._store_lost = False
        self._closed = False
        self._rounds = 0
        self._failures = 0
        self._peers_dropped = 0
        self._generation = 0
        self._last_round_s = 0.0
        self._done_nodes = 0
        self._rounds_metric = AVERAGE_ROUNDS.labels(node=self.node_id)
        self._failures_metric = AVERAGE_FAILURES.labels(node=self.node_id)
        self._live_metric = AVERAGE_LIVE_NODES.labels(node=self.node_id)
        self._live_metric.set(config.world_size)

    # -- stats ---------------------------------------------------------------------------

    @property
    def rounds(self) -> int:
        """Averages completed."""
        return self._rounds

    @property
    def failures(self) -> int:
        """Collectives or group connections that failed."""
        return self._failures

    @property
    def peers_dropped(self) -> int:
        """Peers this node stopped averaging with."""
        return self._peers_dropped

    @property
    def live_world_size(self) -> int:
        """Nodes in this node's averaging group, itself included."""
        return 1 if self._alone else len(self._members)

    @property
    def all_done(self) -> bool:
        """Whether every node of the group said ``done`` in the last round (or this node is
        alone)."""
        return (
            self._alone or self.config.world_size == 1 or (self._done_nodes >= self.live_world_size)
        )

    @property
    def alone(self) -> bool:
        """True once this node has lost every peer (it then trains locally only)."""
        return self._alone

    def stats(self) -> AveragingStats:
        """A snapshot of the counters."""
        return AveragingStats(
            rounds=self._rounds,
            failures=self._failures,
            peers_dropped=self._peers_dropped,
            live_world_size=self.live_world_size,
            generation=self._generation,
            last_round_s=self._last_round_s,
        )

    # -- averaging -----------------------------------------------------------------------

    def maybe_average_(self, modules: Sequence[torch.nn.Module], step: int, weight: float) -> bool:
        """``average_`` when ``step % every_steps == 0``; False (and nothing done) otherwise."""
        if step % self.config.every_steps != 0:
            return False
        return self.average_(modules, weight)

    def average_(
        self, modules: Sequence[torch.nn.Module], weight: float, *, done: bool = False
    ) -> bool:
        """Replace the modules' parameters, in place, by their weighted mean over live nodes.

        ``weight`` is this node's share, e.g. the events it learned since the last average;
        if every node passes 0, all count equally. Returns True if the parameters now hold
        the mean, False if this node could not average (a failure, or it is alone): then the
        parameters are exactly as they were. Peer failures never raise.

        ``done`` says this node has no more events: a node that finishes keeps averaging
        (with ``done``) until ``all_done``, so every node makes the same number of rounds
        whatever its share of the stream.
        """
        if self._closed:
            msg = "the averager is closed"
            raise RuntimeError(msg)
        if not (math.isfinite(weight) and weight >= 0):
            msg = f"weight must be finite and non-negative, got {weight}"
            raise ValueError(msg)
        params = _parameters(modules)
        if not params:
            msg = "the modules have no parameters to average"
            raise ValueError(msg)
        if self.config.world_size == 1:
            self._count_round()
            return True
        if self._alone and not self._admit_joiners():
            return False

        began = time.monotonic()
        try:
            if not self._joined and not self._join(began):
                return False
            flat = torch.cat([p.detach().reshape(-1).to("cpu", torch.float64) for p in params])
            pending = self._pending_joins()
            for _ in range(_MAX_ATTEMPTS):
                attempt_began = time.monotonic()
                mean = self._mean_once(flat, 0.0 if self._adopting else weight, done, pending)
                if mean is not None:
                    with torch.no_grad():
                        offset = 0
                        for p in params:
                            p.copy_(mean[offset : offset + p.numel()].view_as(p))
                            offset += p.numel()
                    self._count_round()
                    self._adopting = False
                    if self._joins_asked:  # every member saw the same sum: all re-form
                        self._reform(time.monotonic())
                    return True
                self._count_failure()
                if not self._reform(attempt_began):
                    return False
            return False
        finally:
            self._last_round_s = time.monotonic() - began

    def _mean_once(
        self, flat: torch.Tensor, weight: float, done: bool, pending: int
    ) -> torch.Tensor | None:
        """One FedAvg collective on the current group: the mean, or None if it failed."""
        reduced = self._all_reduce(flat, weight, done, pending)
        if reduced is None:
            return None
        self._done_nodes = round(float(reduced[-1]))
        self._joins_asked = round(float(reduced[-3]))
        total = float(reduced[-2])
        if total > 0:
            return reduced[:-3] / total
        # No node learned anything since the last average (e.g. at step 0): equal weights
        # (a node adopting the group's flow still counts 0). Every node sees the same total,
        # so every node takes this branch.
        reduced = self._all_reduce(flat, 0.0 if self._adopting else 1.0, done, pending)
        if reduced is None:
            return None
        return reduced[:-3] / float(reduced[-2])

    def _all_reduce(
        self, flat: torch.Tensor, weight: float, done: bool, pending: int
    ) -> torch.Tensor | None:
        group = self._group
        if group is None:
            return None
        buffer = torch.empty(flat.numel() + 3, dtype=torch.float64)
        torch.mul(flat, weight, out=buffer[:-3])
        buffer[-3] = float(pending)
        buffer[-2] = weight
        buffer[-1] = float(done)
        try:
            # Backend.allreduce exists at runtime; torch's stub only declares it on ProcessGroup.
            group.allreduce([buffer]).wait()  # type: ignore[attr-defined]
        except Exception as exc:
            log.warning(
                "node %s: averaging collective failed in generation %d (%d nodes): %s",
                self.node_id,
                self._generation,
                len(self._members),
                _first_line(exc),
            )
            return None
        return buffer

    # -- group membership ----------------------------------------------------------------

    def _open_store(self) -> TCPStore:
        cfg = self.config
        timeout = timedelta(seconds=cfg.timeout_s)
        if cfg.rank != 0 or not cfg.store_on_rank0:
            _await_listener(cfg.host, cfg.port, cfg.timeout_s)
            return TCPStore(cfg.host, cfg.port, None, False, timeout)
        return _host_store(cfg.host, cfg.port, timeout)

    def _open_namespace(self) -> Store | None:
        """The group's namespace in the store, reached on first use (None once lost)."""
        if self._namespace is None and not self._store_lost:
            cfg = self.config
            try:
                self._store = _call_bounded(self._open_store, cfg.timeout_s + _SLACK_S, "store")
            except Exception as exc:
                log.error(
                    "node %s: cannot reach the averaging store at %s, training alone: %s",
                    self.node_id,
                    cfg.init_method,
                    _first_line(exc),
                )
                self._count_failure()
                self._lose_store()
                return None
            self._namespace = PrefixStore(_NAMESPACE, self._store)
        return self._namespace

    def _store_call(self, fn: Callable[[], _T], what: str) -> _T | None:
        """``fn()`` on the store, bounded; None (and the store given up) if it fails."""
        try:
            return _call_bounded(fn, self.config.timeout_s + _SLACK_S, what)
        except Exception as exc:
            log.error(
                "node %s: the averaging store failed (%s): %s", self.node_id, what, _first_line(exc)
            )
            self._count_failure()
            self._lose_store()
            return None

    def _join(self, began: float) -> bool:
        """First use: reach the store, then connect every rank (generation 0) or, if the
        group already runs, ask it for admission."""
        self._joined = True
        namespace = self._open_namespace()
        if namespace is None:
            self._go_alone()
            return False
        cfg = self.config
        running = self._group_formed(namespace)
        if running is None:
            self._go_alone()
            return False
        if running:
            return self._join_running_group(namespace, began)
        connect = functools.partial(
            _connect_group, namespace, 0, cfg.rank, cfg.world_size, self._collective_s
        )
        try:
            self._group = _call_bounded(connect, self._collective_s + _SLACK_S, "connect")
        except Exception as exc:
            log.warning(
                "node %s: could not connect all %d nodes: %s",
                self.node_id,
                cfg.world_size,
                _first_line(exc),
            )
            self._count_failure()
            return self._reform(began)
        self._store_call(lambda: namespace.compare_set(_CURRENT, "", "0"), "store")
        log.info("node %s: averaging with %d nodes", self.node_id, cfg.world_size)
        return True

    def _group_formed(self, namespace: Store) -> bool | None:
        """Whether a member set was ever agreed in the store (None: the store failed)."""
        return self._store_call(lambda: namespace.check([_CURRENT]), "store")

    def _join_running_group(self, namespace: Store, began: float) -> bool:
        """A newcomer (e.g. a restarted node): wait up to ``timeout_s`` for the group to
        admit it, connect, and adopt the group's flow at the first round."""
        cfg = self.config
        deadline = began + cfg.timeout_s
        admission = self._store_call(
            functools.partial(_await_admission, namespace, cfg.rank, deadline), "admission"
        )
        if admission is None or admission[0] < 0:
            if admission is not None:
                log.warning(
                    "node %s: the running averaging group did not admit it within %.0f s, "
                    "training alone",
                    self.node_id,
                    cfg.timeout_s,
                )
            self._go_alone()
            return False
        generation, members = admission
        if not self._connect(namespace, generation, members):
            self._go_alone()
            return False
        self._generation, self._members, self._adopting = generation, members, True
        self._live_metric.set(len(members))
        log.warning(
            "node %s: admitted to the running averaging group as generation %d with ranks %s; "
            "it adopts the group's flow at its first round",
            self.node_id,
            generation,
            list(members),
        )
        return True

    def _connect(self, namespace: Store, generation: int, members: tuple[int, ...]) -> bool:
        """Connect this node's place among ``members`` as ``generation``; False (counted) if
        the group could not be connected in time."""
        connect = functools.partial(
            _connect_group,
            namespace,
            generation,
            members.index(self.config.rank),
            len(members),
            self._collective_s,
        )
        try:
            self._group = _call_bounded(connect, self._collective_s + _SLACK_S, "connect")
        except Exception as exc:
            log.warning(
                "node %s: could not connect generation %d %s: %s",
                self.node_id,
                generation,
                list(members),
                _first_line(exc),
            )
            self._count_failure()
            return False
        return True

    def _pending_joins(self) -> int:
        """How many ranks outside the group ask to join it (0 if none could, or no store)."""
        namespace = self._namespace
        outsiders = [r for r in range(self.config.world_size) if r not in self._members]
        if namespace is None or not outsiders or self._left:
            return 0
        check = functools.partial(_pending_joins, namespace, self._generation, outsiders)
        return self._store_call(check, "joins") or 0

    def _admit_joiners(self) -> bool:
        """Alone: re-form with the nodes that ask to join, if any. True once in a group."""
        if not self._pending_joins():
            return False
        return self._reform(time.monotonic())

    def _reform(self, attempt_began: float) -> bool:
        """After a failure, or to admit joiners: agree on the members, connect them. False if
        now alone."""
        namespace = self._namespace
        cfg = self.config
        for _ in range(_MAX_REFORMS):
            self._drop_group()
            if namespace is None:
                break
            old = self._members
            generation = self._generation + 1
            now = time.monotonic()
            close_at = max(attempt_began + cfg.timeout_s, now + cfg.timeout_s * _MIN_WAIT_SHARE)
            agree = functools.partial(
                _agree_members, namespace, generation, cfg.rank, old, close_at, cfg.world_size
            )
            try:
                members = _call_bounded(agree, close_at - now + _SLACK_S, "membership")
            except Exception as exc:
                log.error(
                    "node %s: the averaging store failed while re-forming the group: %s",
                    self.node_id,
                    _first_line(exc),
                )
                self._lose_store()
                break
            self._generation = generation
            if cfg.rank not in members or len(members) < 2:
                log.warning(
                    "node %s: no peer left in generation %d (members %s), training alone",
                    self.node_id,
                    generation,
                    list(members),
                )
                break
            self._peers_dropped += len(set(old) - set(members))
            self._members = members
            self._live_metric.set(len(members))
            if not self._connect(namespace, generation, members):
                attempt_began = time.monotonic()
                continue
            log.warning(
                "node %s: averaging group re-formed as generation %d with ranks %s",
                self.node_id,
                generation,
                list(members),
            )
            self._alone = False
            return True
        self._go_alone()
        return False

    def _go_alone(self) -> None:
        """Train alone; a node with the store still admits nodes that ask to join."""
        self._drop_group()
        self._peers_dropped += len(self._members) - 1
        self._members = (self.config.rank,)
        self._alone = True
        self._live_metric.set(1)

    def _lose_store(self) -> None:
        self._store_lost = True
        self._namespace = None

    def _drop_group(self) -> None:
        group, self._group = self._group, None
        if group is None:
            return
        try:
            group.shutdown()  # closes its connections now, so peers waiting on us fail fast
        except Exception as exc:
            log.debug("node %s: shutting the gloo group down: %s", self.node_id, exc)

    def _count_round(self) -> None:
        self._rounds += 1
        self._rounds_metric.inc()

    def _count_failure(self) -> None:
        self._failures += 1
        self._failures_metric.inc()

    # -- values kept for newcomers ---------------------------------------------------------

    def group_running(self) -> bool:
        """Whether this node's group has formed before (so this node would be a newcomer
        if it has not joined yet). False without a store."""
        namespace = self._open_namespace()
        return namespace is not None and bool(self._group_formed(namespace))

    def share(self, key: str, value: str) -> str | None:
        """Keep ``value`` under ``key`` in the group's store unless a value is there already
        (the first writer wins), for nodes that join later; returns the value kept (None: no
        store). Best effort."""
        namespace = self._open_namespace()
        if namespace is None:
            return None
        kept = self._store_call(lambda: namespace.compare_set(f"shared/{key}", "", value), "share")
        return None if kept is None else kept.decode()

    def shared(self, key: str) -> str | None:
        """The value kept under ``key`` (None: none, or no store)."""
        namespace = self._open_namespace()
        if namespace is None:
            return None
        name = f"shared/{key}"
        raw = self._store_call(
            lambda: namespace.get(name) if namespace.check([name]) else None, "shared"
        )
        return None if raw is None else raw.decode()

    def leave(self) -> None:
        """Train alone for good: no rounds, and no joiner is ever admitted (e.g. a node whose
        preprocessing differs from the group's)."""
        self._joined = self._left = True
        self._go_alone()

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Leave the group and, on a rank 0 that hosts it, stop the store. Safe to call more
        than once.

        Peers notice at their next round, which fails once and re-forms without this node.
        """
        self._closed = True
        self._drop_group()
        self._lose_store()
        self._store = None

    def __enter__(self) -> ParameterAverager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
