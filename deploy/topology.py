"""The farm topology: which stages run, how many of each, where they listen, and their configs.

A topology is a TOML file validated by pydantic into frozen dataclasses. ``[farm]`` names
the chain of stages in order; every stage is a table of its own (``[source]``, ``[l1]``,
``[hlt]``, ``[archive]``), whose ``config`` sub-table fills the node module's config, a
pydantic dataclass (``nodes.l1.L1Config(**table)``) whose fields declare their bounds.
Types are checked strictly (no "1" for an int) and errors name the bad key as a dotted
path in one line, e.g. ``topology.hlt.threads: expected int, got 'x'``.

The roles live in ``deploy.roles``, which builds on this module: a caller that wants each
stage's role checked passes the registry in (``load_topology(path, roles=ROLES)``).

Links are TCP: instance ``i`` of a stage binds ``tcp://<bind>:<port + i>`` and every
instance of the next stage connects to all of them (PUSH/PULL load-balances). Port 0 means
"pick a free port at launch", which only works when one launcher starts every node.

Example:
    >>> topo = load_topology(SHIPPED["synthetic"])
    >>> [stage.name for stage in topo.stages]
    ['source', 'relay', 'sink']
    >>> load_topology("synthetic").with_changes(relay={"count": "2"})
    Traceback (most recent call last):
    ...
    deploy.topology.TopologyError: topology.relay.count: expected int, got '2'
"""

from __future__ import annotations

import dataclasses
import functools
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol

import pydantic
from pydantic import AfterValidator, ConfigDict, Field, ValidationError, model_validator

TOPOLOGY_DIR = Path(__file__).resolve().parent / "topologies"
SHIPPED = {p.stem: p for p in sorted(TOPOLOGY_DIR.glob("*.toml"))}
DEFAULT = SHIPPED["default"]
LOOPBACK = ("127.0.0.1", "localhost", "::1")

#: Values are checked as written, not converted: "1" is no int, 1.5 no int, "yes" no bool
#: (an int is a float). Unknown keys are errors. TOML arrays arrive as tuples (``_tuples``).
STRICT = ConfigDict(strict=True, extra="forbid")


class TopologyError(ValueError):
    """A topology that cannot run; the message starts with the dotted path of the bad key."""

    def __init__(self, *, key: str, problem: str) -> None:
        self.key = key
        super().__init__(f"{key}: {problem}")


class _FieldError(ValueError):
    """Raised inside validation for a value that is bad together with others: names the
    field to blame (``config_error`` turns it into the dotted key)."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(problem)


def _port(value: int) -> int:
    if not 0 <= value < 65536:
        msg = f"must be in [0, 65535], got {value}"
        raise ValueError(msg)
    return value


def _chain(chain: tuple[str, ...]) -> tuple[str, ...]:
    if not chain:
        raise ValueError("needs at least one stage")
    if len(set(chain)) != len(chain):
        msg = f"names a stage twice: {list(chain)}"
        raise ValueError(msg)
    return chain


Port = Annotated[int, AfterValidator(_port)]
PositiveSeconds = Annotated[float, Field(gt=0)]
AtLeastOne = Annotated[int, Field(ge=1)]


@pydantic.dataclasses.dataclass(frozen=True, slots=True, config=STRICT)
class FarmSettings:
    """Farm-wide settings (``[farm]``).

    ``control`` is a heartbeat endpoint for ``trigfarm node`` (the launcher makes its own);
    ``peer_wait_s`` bounds how long a node waits for all its downstream peers to connect
    before it starts sending. ``linger_s`` is how long a stopping node keeps trying to
    deliver batches still queued on its outputs: the next stage is still running then
    (staged stop), so this only runs out if it died; what is lost then shows up as an
    unbalanced link in the report. ``socket_buffer_kib`` caps the kernel's TCP buffers of
    every data socket (0: the OS's autotuned ones, up to tens of MB on loopback): with
    the high-water marks it bounds what a stopped or dead reader takes with it.
    """

    name: str
    chain: Annotated[tuple[str, ...], AfterValidator(_chain)]
    host: str = "127.0.0.1"
    heartbeat_interval_s: PositiveSeconds = 0.5
    drain_idle_s: PositiveSeconds = 0.5
    stall_after_s: PositiveSeconds = 60.0
    sndhwm: Annotated[int, pydantic.Field(ge=0)] = 20
    rcvhwm: Annotated[int, pydantic.Field(ge=0)] = 20
    control: str = ""
    peer_wait_s: PositiveSeconds = 60.0
    linger_s: PositiveSeconds = 300.0
    socket_buffer_kib: Annotated[int, Field(ge=0)] = 256


@pydantic.dataclasses.dataclass(frozen=True, slots=True, config=STRICT)
class SecuritySettings:
    """``[security]``: CURVE on every data link, with key pairs from ``keys_dir``.

    ``keys_dir`` holds ``<stage>.key`` and ``<stage>.key_secret`` per stage, as written by
    ``trigfarm keys``; a relative path is taken from the topology file's folder.
    """

    curve: bool = False
    keys_dir: str = ""


@pydantic.dataclasses.dataclass(frozen=True, slots=True, config=STRICT)
class MetricsSettings:
    """``[metrics]``: where nodes serve Prometheus metrics (node k gets ``base_port + k``).

    ``base_port`` 0 lets each node pick a free port (the launcher records them).
    ``enabled`` false serves no metrics at all.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    base_port: Port = 0


@pydantic.dataclasses.dataclass(frozen=True, slots=True, config=STRICT)
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
    count: AtLeastOne = 1
    threads: AtLeastOne = 1
    hosts: tuple[str, ...] = ()
    bind: str = ""
    port: Port = 0
    drop_when_full: bool = False
    max_queue_batches: AtLeastOne = 4
    config: Mapping[str, Any] = field(default_factory=dict)
    learner: Mapping[str, Any] | None = None

    @model_validator(mode="after")
    def _fits(self) -> StageSpec:
        if self.port + self.count > 65536:
            msg = f"must leave {self.count} ports below 65536, got {self.port}"
            raise _FieldError("port", msg)
        if not self.hosts or len(self.hosts) not in (1, self.count):
            msg = f"needs 1 or count={self.count} entries, got {len(self.hosts)}"
            raise _FieldError("hosts", msg)
        return self

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
        """A copy with some stage fields replaced: ``with_changes(hlt={"count": 4})``.

        Raises:
            TopologyError: a changed value that is invalid, or a stage the topology does
                not have (names the key).
        """
        unknown = sorted(set(stage_changes) - {stage.name for stage in self.stages})
        if unknown:
            raise TopologyError(key=f"topology.{unknown[0]}", problem="no such stage")
        stages = []
        for stage in self.stages:
            changes = dict(stage_changes.get(stage.name, {}))
            if "config" in changes:
                changes["config"] = {**stage.config, **changes["config"]}
            values = {f.name: getattr(stage, f.name) for f in dataclasses.fields(stage)}
            stages.append(_validate(StageSpec, {**values, **changes}, f"topology.{stage.name}"))
        return Topology(self.farm, tuple(stages), self.security, self.metrics, self.path)


class StageRole(Protocol):
    """What the topology needs to know of a role (``deploy.roles.Role`` is one)."""

    @property
    def consumes(self) -> bool: ...
    @property
    def output_port(self) -> str | None: ...
    @property
    def learner(self) -> tuple[str, str, str] | None: ...

    def check(self, stage: StageSpec, where: str, *, deep: bool = False) -> None: ...


# -- loading --------------------------------------------------------------------------------


def load_topology(
    path: str | Path | None = None,
    *,
    roles: Mapping[str, StageRole] | None = None,
    deep: bool = False,
) -> Topology:
    """Read and validate a topology file (the shipped default when ``path`` is None).

    A bare name (``"synthetic"``) picks a shipped topology. ``roles`` is the role registry
    (``deploy.roles.ROLES``) that each stage's role is checked against; without it only the
    file's structure and values are checked. ``deep`` also imports each role's node
    module and validates its config tables (the launcher leaves that to each node process,
    so that it never imports TensorFlow or torch itself).

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
    return parse_topology(table, path=str(path.resolve()), roles=roles, deep=deep)


def parse_topology(
    table: Mapping[str, Any],
    *,
    path: str = "",
    roles: Mapping[str, StageRole] | None = None,
    deep: bool = False,
) -> Topology:
    """Validate a topology given as plain data (a parsed TOML document); ``roles`` and
    ``deep`` as for ``load_topology``."""
    farm = _validate(FarmSettings, _table(table, "farm", required=True), "topology.farm")
    security = _validate(SecuritySettings, _table(table, "security"), "topology.security")
    metrics = _validate(MetricsSettings, _table(table, "metrics"), "topology.metrics")
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
    if roles is not None:
        check_roles(topology, roles, deep=deep)
    return topology


def _stage(table: Mapping[str, Any], name: str, farm: FarmSettings) -> StageSpec:
    body = dict(_table(table, name, required=True))
    body.setdefault("role", name)
    if isinstance(body.get("hosts"), str):
        body["hosts"] = [body["hosts"]]
    body.setdefault("hosts", [farm.host])
    return _validate(StageSpec, {"name": name, **body}, f"topology.{name}")


def check_roles(topology: Topology, roles: Mapping[str, StageRole], *, deep: bool) -> None:
    """Check every stage's role against the registry ``roles`` and its place in the chain;
    with ``deep``, each role also validates the stage's config tables.

    Raises:
        TopologyError: an unknown role, or one in the wrong place (names the key).
    """
    for index, stage in enumerate(topology.stages):
        where = f"topology.{stage.name}"
        role = roles.get(stage.role)
        if role is None:
            raise TopologyError(
                key=f"{where}.role",
                problem=f"unknown role {stage.role!r}; known: {sorted(roles)}",
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


def _table(table: Mapping[str, Any], key: str, *, required: bool = False) -> Mapping[str, Any]:
    where = f"topology.{key}"
    value = table.get(key)
    if value is None:
        if required:
            raise TopologyError(key=where, problem="missing table")
        return {}
    if not isinstance(value, dict):
        raise TopologyError(key=where, problem=f"expected a table, got {value!r}")
    return value


# -- validation (pydantic) ------------------------------------------------------------------


def fill_config(cls: type, table: Mapping[str, Any], where: str) -> Any:
    """``cls(**table)`` for a config dataclass, each value's type checked strictly against
    its annotation first, as the topology's own tables are; ``cls``, a pydantic dataclass,
    then checks the values (in lax mode, which would take "1" for 1).

    Raises:
        TopologyError: an unknown or missing key, a value of the wrong type or out of its
            bounds (names the key), or one that is bad together with others (prefixed with
            ``where``).
    """
    values = _validate(_table_model(cls), table, where)
    try:
        return cls(**{key: getattr(values, key) for key in table})
    except ValidationError as exc:  # a pydantic dataclass's checks of its values
        raise config_error(exc, table, where, cls) from None


@functools.cache
def _table_model(cls: type) -> type[pydantic.BaseModel]:
    """A pydantic model of the dataclass ``cls``'s fields (types only: the dataclass
    checks its values itself when it is built from the validated table)."""
    if not dataclasses.is_dataclass(cls):
        msg = f"{cls!r} is not a dataclass"
        raise TypeError(msg)
    hints = typing.get_type_hints(cls)
    required = (dataclasses.MISSING, dataclasses.MISSING)
    specs: dict[str, Any] = {
        f.name: (hints[f.name], ... if (f.default, f.default_factory) == required else None)
        for f in dataclasses.fields(cls)
    }
    model: type[pydantic.BaseModel] = pydantic.create_model(
        f"{cls.__name__}Table", __config__=STRICT, **specs
    )
    return model


_T = typing.TypeVar("_T")

_EXPECTED = {
    "int_type": "int",
    "float_type": "float",
    "bool_type": "bool",
    "string_type": "str",
    "none_required": "None",
    "tuple_type": "a list",
    "list_type": "a list",
    "dict_type": "a table",
    "mapping_type": "a table",
}
_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _validate(cls: type[_T], table: Mapping[str, Any], where: str) -> _T:
    """``cls`` validated from ``table`` (TOML arrays as tuples), or a ``TopologyError``."""
    try:
        return cls(**{key: _tuples(value) for key, value in table.items()})
    except ValidationError as exc:
        raise config_error(exc, table, where, cls) from None


def _tuples(value: Any) -> Any:
    """TOML arrays (lists) as tuples, arrays of arrays too; sub-tables are left as they are
    (a role's config table is validated when its node is built)."""
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    return value


def config_error(
    exc: ValidationError, table: Mapping[str, Any], where: str, cls: type
) -> TopologyError:
    """The first failing key of ``exc`` (from validating ``table`` into ``cls``) as a
    one-line ``TopologyError`` keyed under ``where``; the expectations of a union's members
    are joined (``expected str | int``). The command lines use it for their options too."""
    errors = exc.errors()
    key, value = _key(errors[0]["loc"], table, where)
    first = errors[0]
    error = first.get("ctx", {}).get("error")
    if isinstance(error, _FieldError):
        return TopologyError(key=f"{where}.{error.field}", problem=error.problem)
    kind = first["type"]
    if kind in _EXPECTED:
        expected = []
        for other in errors:
            if _key(other["loc"], table, where)[0] == key and other["type"] in _EXPECTED:
                name = _EXPECTED[other["type"]]
                expected += [name] if name not in expected else []
        return TopologyError(key=key, problem=f"expected {' | '.join(expected)}, got {value!r}")
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        known = (
            sorted(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else []
        )
        return TopologyError(key=key, problem=f"unknown key; known: {known}")
    if kind in ("missing", "missing_argument"):
        return TopologyError(key=key, problem="missing")
    last = first["loc"][-1] if first["loc"] else None
    if isinstance(value, str) and isinstance(last, str) and first.get("input") != value:
        # a field of what the string was parsed into, as "wprime?m_x_gev=-5" is a recipe's
        key, value = f"{key}.{last}", first.get("input")
    if error is not None:
        return TopologyError(key=key, problem=str(error))
    bound = next((b for b in _BOUNDS if b in first.get("ctx", {})), None)
    if bound is not None:
        limit = first["ctx"][bound]
        return TopologyError(key=key, problem=f"must be {_BOUNDS[bound]} {limit}, got {value!r}")
    problem = first["msg"].replace("Input should be", "must be", 1)  # a Literal's choices
    return TopologyError(key=key, problem=f"{problem}, got {value!r}")


def _key(loc: tuple[int | str, ...], table: Any, where: str) -> tuple[str, Any]:
    """The dotted key of a pydantic error location and the value found there; location
    parts that do not index into the input (a union member's name) are left out."""
    key, value = where, table
    for part in loc:
        if isinstance(part, int) and isinstance(value, list | tuple) and part < len(value):
            key, value = f"{key}[{part}]", value[part]
        elif isinstance(part, str) and isinstance(value, Mapping) and part in value:
            key, value = f"{key}.{part}", value[part]
        elif isinstance(part, str) and value is table:
            key, value = f"{key}.{part}", None  # a missing key
        else:
            break
    return key, value
