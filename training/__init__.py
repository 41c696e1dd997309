"""The training floor (DESIGN.md: above ``callbacks``, below ``discovery``, the claim code and ``cli.py``): the
LightningCLI behind ``litpapers fit|validate|test`` (:mod:`training.cli`) and the training of the built-in checkpoints
the MiniLLM and QDPO configs start from (:mod:`training.builtin_checkpoints`). ``python -m training fit ...`` runs the
LightningCLI on this floor (the built-in checkpoints are trained that way, never through ``cli``)."""
