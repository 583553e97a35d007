"""``python -m deploy`` runs the ``trigfarm`` CLI."""

from deploy.cli import main

main()
