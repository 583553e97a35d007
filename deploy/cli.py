"""The ``trigfarm`` command line."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from typing import Any

import click

#: Subcommand name -> "module:attribute". Imported only when used, so that a light command
#: (``trigfarm simulate``, ``trigfarm run``, and the spawned workers that re-import the CLI)
#: does not pay for torch and TensorFlow.
COMMANDS: Mapping[str, str] = {
    "simulate": "deploy.simulate_cli:simulate",
    "firmware": "deploy.firmware_cli:firmware",
    "hlt": "deploy.hlt_cli:hlt",
    "analyze": "deploy.analyze_cli:analyze",
    "run": "deploy.farm_cli:run",
    "replay": "deploy.farm_cli:replay",
    "node": "deploy.farm_cli:node",
    "rendezvous": "deploy.farm_cli:rendezvous",
    "keys": "deploy.farm_cli:keys",
    "monitor": "deploy.farm_cli:monitor",
    "deploy": "deploy.farm_cli:deploy",
}


class LazyGroup(click.Group):
    """A click group that imports each subcommand's module on first use."""

    def __init__(self, *args: Any, lazy: Mapping[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)
        module, attribute = self.lazy[cmd_name].split(":")
        command: click.Command = getattr(importlib.import_module(module), attribute)
        return command


@click.group(
    cls=LazyGroup,
    lazy=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """trigfarm: a simulated LHC trigger farm that learns online."""
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
