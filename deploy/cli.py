"""The ``trigfarm`` command line."""

from __future__ import annotations

import logging

import click

from deploy.analyze_cli import analyze
from deploy.farm_cli import FARM_COMMANDS
from deploy.firmware_cli import firmware
from deploy.hlt_cli import hlt
from deploy.simulate_cli import simulate


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """trigfarm: a simulated LHC trigger farm that learns online."""
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


main.add_command(simulate)
main.add_command(firmware)
main.add_command(hlt)
main.add_command(analyze)
for command in FARM_COMMANDS:
    main.add_command(command)
