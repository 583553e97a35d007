"""Roles: how each kind of stage turns its config table into a running worker.

A role names the node module, its config dataclass and its ``build`` function; modules
are imported only when a node of that role is built (so a farm without an HLT never
imports torch, and the parent launcher never imports TensorFlow). The synthetic roles
(``deploy.synthetic``) wrap ``stream.testing`` fakes: they exercise the launcher and the
wire, not physics, and are imported only when a synthetic farm runs.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from deploy.topology import StageSpec, TopologyError, fill_config
from stream.node import Processor, Producer


@dataclass(frozen=True, slots=True)
class LaunchContext:
    """What the launcher knows when it builds a node: its name, index and run settings."""

    name: str
    index: int
    out_dir: str
    events: int = 0
    threads: int = 1
    rendezvous: str = ""  # the launcher's averaging store for the stage, chosen per run


@dataclass(frozen=True, slots=True)
class Role:
    """How to build one kind of node.

    Attributes:
        module: the module holding the config class and the builder.
        config_class: name of the config dataclass in ``module``.
        builder: name of ``build(config, *, name, ...)`` in ``module``.
        consumes: whether it takes an input (everything but sources).
        output_port: the port the next stage reads (``None``: a terminal stage).
        stores_records: it confirms the records it stores with receipts
            (``stream.receipts``), on a port of its own, to the stage before it.
        learner: (module, config class, builder) of the online learner it can take.
        events_key: config field set from ``trigfarm run --events``.
        threads_key: config field set from the stage's ``threads`` unless given.
        out_dir_key: config field set to the node's own folder under ``--out``.
    """

    module: str
    config_class: str
    builder: str = "build"
    consumes: bool = True
    output_port: str | None = "out"
    stores_records: bool = False
    learner: tuple[str, str, str] | None = None
    events_key: str = ""
    threads_key: str = ""
    out_dir_key: str = ""

    def available(self) -> bool:
        """Whether the role's module is installed (other stages may still be in review)."""
        try:
            return importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:
            return False

    def config_type(self) -> type:
        return getattr(_import(self.module), self.config_class)

    def check(self, stage: StageSpec, where: str, *, deep: bool = False) -> None:
        """With ``deep``, import the module and validate the stage's config tables."""
        if not deep:
            return
        if not self.available():
            raise TopologyError(
                key=where, problem=f"role needs module {self.module}, which is not installed"
            )
        launch = LaunchContext(name=stage.name, index=0, out_dir="<out>")
        self.make_config(self.launch_table(stage.config, launch), f"{where}.config")
        if self.learner is not None and stage.learner is not None:
            module, cls, _ = self.learner
            fill_config(getattr(_import(module), cls), stage.learner, f"{where}.learner")

    def make_config(self, table: Mapping[str, Any], where: str) -> Any:
        if not self.available():
            raise TopologyError(
                key=where, problem=f"role needs module {self.module}, which is not installed"
            )
        return fill_config(self.config_type(), table, where)

    def launch_table(self, table: Mapping[str, Any], launch: LaunchContext) -> dict[str, Any]:
        """The config table with the run's settings applied (events, output folder)."""
        body = dict(table)
        names = {f.name for f in fields(self.config_type())}
        if self.threads_key in names and self.threads_key not in body:
            body[self.threads_key] = launch.threads
        if launch.events and self.events_key in names:
            body[self.events_key] = launch.events
        if self.out_dir_key in names and not body.get(self.out_dir_key):
            body[self.out_dir_key] = self.output_path(table, launch)
        return body

    def output_path(self, table: Mapping[str, Any], launch: LaunchContext) -> str:
        """Where the node writes its output (archive folder, sink file); '' if nowhere."""
        if not self.out_dir_key:
            return ""
        if table.get(self.out_dir_key):
            return str(table[self.out_dir_key])
        suffix = ".npy" if self.out_dir_key.endswith("_path") else ""
        return f"{launch.out_dir}/{launch.name}{suffix}"

    def build(
        self,
        stage: StageSpec,
        launch: LaunchContext,
    ) -> Processor | Producer:
        """Build the worker for node ``launch.name`` of ``stage``."""
        where = f"topology.{stage.name}"
        config = self.make_config(self.launch_table(stage.config, launch), f"{where}.config")
        builder: Callable[..., Processor | Producer] = getattr(_import(self.module), self.builder)
        if self.learner is None or stage.learner is None:
            return builder(config, name=launch.name)
        module, cls, build_learner = self.learner
        learner_module = _import(module)
        table = dict(stage.learner)
        if launch.rendezvous and "average_address" not in table:
            table["average_address"] = launch.rendezvous
            table.setdefault("average_store", "external")  # the launcher hosts it (Farm.run)
        learner_config = fill_config(getattr(learner_module, cls), table, f"{where}.learner")
        learner = getattr(learner_module, build_learner)(
            learner_config, node_id=launch.name, node_index=launch.index, node_count=stage.count
        )
        return builder(config, name=launch.name, learner=learner)


def _import(module: str) -> Any:
    return importlib.import_module(module)


ROLES: dict[str, Role] = {
    "source": Role("nodes.source", "SourceConfig", consumes=False, events_key="max_events"),
    "l1": Role("nodes.l1", "L1Config"),
    "hlt": Role(
        "nodes.hlt",
        "HLTConfig",
        output_port="archive",
        learner=("nodes.learner", "FlowLearnerConfig", "build_learner"),
        threads_key="torch_threads",
    ),
    "archive": Role(
        "nodes.archive",
        "ArchiveConfig",
        output_port=None,
        stores_records=True,
        out_dir_key="out_dir",
    ),
    # Synthetic roles: for exercising the farm machinery only.
    "synthetic-source": Role(
        "deploy.synthetic",
        "SyntheticSourceConfig",
        "synthetic_source",
        consumes=False,
        events_key="events",
    ),
    "relay": Role("deploy.synthetic", "RelayConfig", "relay"),
    "sink": Role(
        "deploy.synthetic", "SinkConfig", "sink", output_port=None, out_dir_key="ids_path"
    ),
}
