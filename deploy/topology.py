"""The farm topology: which stages run, how many of each, where they listen, and their configs.

A topology is a TOML file validated into frozen dataclasses. ``[farm]`` names the chain of
stages in order; every stage is a table of its own (``[source]``, ``[l1]``, ``[hlt]``,
``[archive]``), whose ``config`` sub-table fills the node module's config dataclass
(``nodes.l1.L1Config(**table)``). Errors name the bad key as a dotted path, e.g.
``topology.hlt.threads: expected int, got 'x'``.

Links are TCP: instance ``i`` of a stage binds ``tcp://<bind>:<port + i>`` and every
instance of the next stage connects to all of them (PUSH/PULL load-balances). Port 0 means
"pick a free port at launch", which only works when one launcher starts every node.

Example:
    >>> topo = load_topology(SHIPPED["synthetic"])
    >>> [stage.name for stage in topo.stages]
    ['source', 'relay', 'sink']
"""

from __future__ import annotations

import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

TOPOLOGY_DIR = Path(__file__).resolve().parent / "topologies"
SHIPPED = {p.stem: p for p in sorted(TOPOLOGY_DIR.glob("*.toml"))}
DEFAULT = SHIPPED["default"]
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class TopologyError(ValueError):
    """A topology that cannot run; the message starts with the dotted path of the bad key."""

    def __init__(self, *, key: str, problem: str) -> None:
        self.key = key
        super().__init__(f"{key}: {problem}")


@dataclass(frozen=True, slots=True)
class FarmSettings:
    """Farm-wide settings (``[farm]``).

    ``control`` is a heartbeat endpoint for ``trigfarm node`` (the launcher makes its own);
    ``peer_wait_s`` bounds how long a node waits for all its downstream peers to connect
    before it starts sending. ``linger_s`` is how long a stopping node keeps trying to
    deliver batches still queued on its outputs: the next stage is still running then
    (staged stop), so this only runs out if it died; what is lost then shows up as an
    unbalanced link in the report.
    """

    name: str
    chain: tuple[str, ...]
    host: str = "127.0.0.1"
    heartbeat_interval_s: float = 0.5
    drain_idle_s: float = 0.5
    stall_after_s: float = 60.0
    sndhwm: int = 20
    rcvhwm: int = 20
    control: str = ""
    peer_wait_s: float = 60.0
    linger_s: float = 300.0


@dataclass(frozen=True, slots=True)
class SecuritySettings:
    """``[security]``: CURVE on every data link, with key pairs from ``keys_dir``.

    ``keys_dir`` holds ``<stage>.key`` and ``<stage>.key_secret`` per stage, as written by
    ``trigfarm keys``; a relative path is taken from the topology file's folder.
    """

    curve: bool = False
    keys_dir: str = ""


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """``[metrics]``: where nodes serve Prometheus metrics (node k gets ``base_port + k``).

    ``base_port`` 0 lets each node pick a free port (the launcher records them).
    ``enabled`` false serves no metrics at all.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    base_port: int = 0


@dataclass(frozen=True, slots=True)
class StageSpec:
    """One stage: ``count`` identical nodes of a role.

    Attributes:
        name: the table name, used in node names (``hlt-0``) and metric labels.
        role: the role that builds its worker (``deploy.roles.ROLES``); default the name.
        count: how many nodes.
        threads: torch/BLAS/TensorFlow intra-op threads per node.
        hosts: the host of each node (one entry applies to all), where others connect.
        bind: the interface its outputs bind; default the node's host when it is a
            loopback address, else 0.0.0.0.
        port: output port of node 0 (node ``i`` uses ``port + i``); 0 picks one at launch.
        drop_when_full: drop (and count) batches its outputs cannot take at once,
            instead of blocking upstream.
        max_queue_batches: batches received but not yet processed.
        config: the role's config table (``XConfig(**config)``).
        learner: the online learner's config table (roles that take a learner).
    """

    name: str
    role: str
    count: int = 1
    threads: int = 1
    hosts: tuple[str, ...] = ()
    bind: str = ""
    port: int = 0
    drop_when_full: bool = False
    max_queue_batches: int = 4
    config: Mapping[str, Any] = field(default_factory=dict)
    learner: Mapping[str, Any] | None = None

    def host(self, index: int) -> str:
        """The host node ``index`` of this stage runs on."""
        return self.hosts[index] if len(self.hosts) > 1 else self.hosts[0]

    def bind_host(self, index: int) -> str:
        """The interface node ``index`` binds its outputs on."""
        if self.bind:
            return self.bind
        host = self.host(index)
        return host if host in LOOPBACK else "0.0.0.0"

    def node_names(self) -> list[str]:
        """``name-0``, ``name-1``...; a single node keeps the bare stage name."""
        if self.count == 1:
            return [self.name]
        return [f"{self.name}-{i}" for i in range(self.count)]


@dataclass(frozen=True, slots=True)
class Topology:
    """A validated farm: settings plus the stages in chain order."""

    farm: FarmSettings
    stages: tuple[StageSpec, ...]
    security: SecuritySettings = field(default_factory=SecuritySettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    path: str = ""

    def stage(self, name: str) -> StageSpec:
        for stage in self.stages:
            if stage.name == name:
                return stage
        msg = f"no stage {name!r} in topology {self.farm.name!r} ({list(self.farm.chain)})"
        raise KeyError(msg)

    def upstream(self, name: str) -> StageSpec | None:
        """The stage feeding ``name`` (``None`` for the first)."""
        index = self.farm.chain.index(name)
        return self.stages[index - 1] if index else None

    def downstream(self, name: str) -> StageSpec | None:
        """The stage ``name`` feeds (``None`` for the last)."""
        index = self.farm.chain.index(name)
        return self.stages[index + 1] if index + 1 < len(self.stages) else None

    def keys_dir(self) -> Path:
        """Where CURVE keys live, resolved against the topology file's folder."""
        path = Path(self.security.keys_dir or "keys")
        if not path.is_absolute() and self.path:
            path = Path(self.path).parent / path
        return path

    def with_changes(self, **stage_changes: Mapping[str, Any]) -> Topology:
        """A copy with some stage fields replaced: ``with_changes(hlt={"count": 4})``."""
        stages = []
        for stage in self.stages:
            changes = dict(stage_changes.get(stage.name, {}))
            if "config" in changes:
                changes["config"] = {**stage.config, **changes["config"]}
            stages.append(_replace(stage, changes))
        return Topology(self.farm, tuple(stages), self.security, self.metrics, self.path)


def _replace(obj: Any, changes: Mapping[str, Any]) -> Any:
    values = {f.name: getattr(obj, f.name) for f in fields(obj)}
    values.update(changes)
    return type(obj)(**values)


# -- loading --------------------------------------------------------------------------------


def load_topology(path: str | Path | None = None, *, deep: bool = False) -> Topology:
    """Read and validate a topology file (the shipped default when ``path`` is None).

    A bare name (``"synthetic"``) picks a shipped topology. ``deep`` also imports each
    role's node module and validates its config tables (the launcher leaves that to each
    node process, so that it never imports TensorFlow or torch itself).

    Raises:
        TopologyError: a missing, malformed or invalid topology (names the bad key).
    """
    if path is None:
        path = DEFAULT
    if isinstance(path, str) and path in SHIPPED:
        path = SHIPPED[path]
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text())
    except OSError as exc:
        raise TopologyError(key="topology", problem=f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(key="topology", problem=f"{path} is not valid TOML: {exc}") from exc
    return parse_topology(table, path=str(path.resolve()), deep=deep)


def parse_topology(table: Mapping[str, Any], *, path: str = "", deep: bool = False) -> Topology:
    """Validate a topology given as plain data (a parsed TOML document)."""
    farm_table = _table(table, "farm", "topology.farm", required=True)
    farm = _fill(FarmSettings, farm_table, "topology.farm")
    if not farm.chain:
        raise TopologyError(key="topology.farm.chain", problem="needs at least one stage")
    if len(set(farm.chain)) != len(farm.chain):
        raise TopologyError(
            key="topology.farm.chain", problem=f"names a stage twice: {list(farm.chain)}"
        )
    for key in ("heartbeat_interval_s", "drain_idle_s", "stall_after_s", "peer_wait_s", "linger_s"):
        if getattr(farm, key) <= 0:
            raise TopologyError(
                key=f"topology.farm.{key}", problem=f"must be > 0, got {getattr(farm, key)}"
            )
    security = _fill(
        SecuritySettings, _table(table, "security", "topology.security"), "topology.security"
    )
    metrics = _fill(
        MetricsSettings, _table(table, "metrics", "topology.metrics"), "topology.metrics"
    )
    if not 0 <= metrics.base_port < 65536:
        raise TopologyError(
            key="topology.metrics.base_port",
            problem=f"must be in [0, 65535], got {metrics.base_port}",
        )
    known = {"farm", "security", "metrics", *farm.chain}
    for key in table:
        if key not in known:
            hint = (
                f"; add it to topology.farm.chain {list(farm.chain)}"
                if isinstance(table[key], dict)
                else ""
            )
            raise TopologyError(key=f"topology.{key}", problem=f"unknown key{hint}")
    stages = tuple(_stage(table, name, farm) for name in farm.chain)
    topology = Topology(farm, stages, security, metrics, path)
    _check_roles(topology, deep=deep)
    return topology


def _stage(table: Mapping[str, Any], name: str, farm: FarmSettings) -> StageSpec:
    where = f"topology.{name}"
    body = dict(_table(table, name, where, required=True))
    body.setdefault("role", name)
    if isinstance(body.get("hosts"), str):
        body["hosts"] = [body["hosts"]]
    body.setdefault("hosts", [farm.host])
    stage = _fill(StageSpec, {"name": name, **body}, where)
    for key in ("count", "threads", "max_queue_batches"):
        if getattr(stage, key) < 1:
            raise TopologyError(
                key=f"{where}.{key}", problem=f"must be >= 1, got {getattr(stage, key)}"
            )
    if not 0 <= stage.port < 65536 or stage.port + stage.count > 65536:
        raise TopologyError(
            key=f"{where}.port",
            problem=f"must leave {stage.count} ports below 65536, got {stage.port}",
        )
    if not stage.hosts or len(stage.hosts) not in (1, stage.count):
        raise TopologyError(
            key=f"{where}.hosts",
            problem=f"needs 1 or count={stage.count} entries, got {len(stage.hosts)}",
        )
    return stage


def _check_roles(topology: Topology, *, deep: bool) -> None:
    from deploy.roles import ROLES  # the registry imports node modules lazily

    for index, stage in enumerate(topology.stages):
        where = f"topology.{stage.name}"
        role = ROLES.get(stage.role)
        if role is None:
            raise TopologyError(
                key=f"{where}.role",
                problem=f"unknown role {stage.role!r}; known: {sorted(ROLES)}",
            )
        if index == 0 and role.consumes:
            raise TopologyError(
                key=f"{where}.role",
                problem=f"the first stage must produce events; {stage.role!r} consumes them",
            )
        if index > 0 and not role.consumes:
            raise TopologyError(
                key=f"{where}.role",
                problem=f"{stage.role!r} is a source and can only come first",
            )
        if index + 1 < len(topology.stages) and role.output_port is None:
            raise TopologyError(
                key=f"{where}.role",
                problem=f"{stage.role!r} has no output but feeds another stage",
            )
        if stage.learner is not None and role.learner is None:
            raise TopologyError(
                key=f"{where}.learner", problem=f"role {stage.role!r} takes no learner"
            )
        role.check(stage, where, deep=deep)


# -- typed filling --------------------------------------------------------------------------


def _table(
    table: Mapping[str, Any], key: str, where: str, *, required: bool = False
) -> Mapping[str, Any]:
    value = table.get(key)
    if value is None:
        if required:
            raise TopologyError(key=where, problem="missing table")
        return {}
    if not isinstance(value, dict):
        raise TopologyError(key=where, problem=f"expected a table, got {value!r}")
    return value


def fill_config(cls: type, table: Mapping[str, Any], where: str) -> Any:
    """``cls(**table)`` for a config dataclass, with each value checked against its type.

    Raises:
        TopologyError: an unknown or missing key, a value of the wrong type, or the
            dataclass's own ``ValueError`` (prefixed with ``where``).
    """
    return _fill(cls, table, where)


def _fill(cls: type, table: Mapping[str, Any], where: str) -> Any:
    if not is_dataclass(cls):
        msg = f"{cls!r} is not a dataclass"
        raise TypeError(msg)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    for key in table:
        if key not in names:
            raise TopologyError(
                key=f"{where}.{key}", problem=f"unknown key; known: {sorted(names)}"
            )
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in table:
            values[f.name] = _coerce(table[f.name], hints[f.name], f"{where}.{f.name}")
        elif f.default is MISSING and f.default_factory is MISSING:
            raise TopologyError(key=f"{where}.{f.name}", problem="missing")
    try:
        return cls(**values)
    except ValueError as exc:
        raise TopologyError(key=where, problem=str(exc)) from exc


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against a simple annotation, converting lists to tuples."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except TopologyError:
                continue
        raise TopologyError(
            key=where,
            problem=f"expected {' | '.join(_type_name(o) for o in options)}, got {value!r}",
        )
    if tp is Any:
        return value
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, list | tuple):
            raise TopologyError(key=where, problem=f"expected a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if (
        origin in (dict, Mapping)
        or tp in (dict, Mapping)
        or origin is typing.get_origin(Mapping[str, Any])
    ):
        if not isinstance(value, dict):
            raise TopologyError(key=where, problem=f"expected a table, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TopologyError(key=where, problem=f"expected float, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TopologyError(key=where, problem=f"expected int, got {value!r}")
        return value
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise TopologyError(key=where, problem=f"expected {tp.__name__}, got {value!r}")
        return value
    return value
