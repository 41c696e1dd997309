"""``python -m training fit|validate|test ...``: the LightningCLI of :mod:`training.cli` (what ``litpapers`` runs for
those subcommands), started on the training floor itself (the built-in checkpoints are trained this way)."""

from training.cli import main

main()
