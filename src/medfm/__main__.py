"""``python -m medfm`` runs the command line."""

from medfm.cli import main

main()
