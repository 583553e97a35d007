"""``python -m deploy`` runs the ``trigfarm`` CLI."""

from deploy.cli import main

# The guard matters: the farm spawns node processes, which import the main module again.
if __name__ == "__main__":
    main()
