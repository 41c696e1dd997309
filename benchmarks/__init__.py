"""Benchmarks by purpose. Here: the claim tests behind ``litpapers reproduce`` (``reproduce.py`` runs
``claim_<paper>.py``; ``claim_real.py`` the real-model rows) and the experiments behind the docs' result tables
(``*_table.py``, ``dpo_losses.py``, ``minillm_toy.py``, ``ademamix_vs_adamw.py``, ``fit_record.py``);
``speed/``: the speed and memory anchors, each side by side with its anchor in one run; ``gpu/``: the GPU check and the
README's GPU table. Each prints one JSON object last."""
