"""``python -m cli ...`` is ``litpapers ...`` (the built-in checkpoints train through it)."""

from cli import main

main()
