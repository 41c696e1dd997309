"""``litpapers`` (``python -m cli``), the top floor: ``litpapers fit|validate|test --config FILE`` runs the
LightningCLI of :mod:`training.cli` (one for every module, datamodule, callback and optimizer in this package),
``litpapers reproduce`` every paper's claim test (:mod:`benchmarks.reproduce`) and ``litpapers discover`` DiscoPOP's
discovery loop (:mod:`discovery`).

    litpapers fit --config configs/ademamix/quick.yaml
    litpapers validate --config configs/probes/probe_local_model.yaml --model.model /path/to/hf_model
    litpapers reproduce --quick

Nothing imports this module: it only dispatches. ``build_cli``, ``main``'s helpers and the CLI classes live in
:mod:`training.cli` and are re-exported here for code that starts the CLI in-process (``cli.build_cli([...])``).
Only what a subcommand needs is imported: ``litpapers reproduce`` and ``discover`` never load Lightning's CLI.
"""

from __future__ import annotations

import sys
from pathlib import Path

from training.console import quiet_console

#: Subcommands that are not Lightning's: name -> one-line help (:func:`run_tool` runs them).
TOOLS = {"reproduce": "run every paper's claim test and write report.md + results.json",
         "discover": "DiscoPOP's discovery loop: LLM-proposed preference losses"}
#: The source checkout, when this module is run from one (``pip install -e .``): ``reproduce`` reads its configs.
ROOT = Path(__file__).resolve().parent


def run_tool(name: str, argv: list[str]) -> int:
    """Run one of :data:`TOOLS` (``benchmarks.reproduce.main`` or ``discovery.main``, each ``main(argv) -> int``).
    ``reproduce`` runs the shipped configs, so it needs the source checkout this package
    was installed from (``pip install -e .``), else the error says so."""
    if name == "reproduce":
        if not (ROOT / "configs").is_dir():
            print(f"error: litpapers {name} runs from a source checkout (it uses benchmarks/ and configs/): "
                  "git clone the repository and run `make demo` or `pip install -e .` there", file=sys.stderr)
            return 2
        from benchmarks import reproduce

        return reproduce.main(argv)
    import discovery

    return discovery.main(argv)


def main() -> None:
    """Console entry point: ``litpapers fit|validate|test|predict --config FILE`` (:func:`training.cli.main`),
    ``litpapers reproduce ...`` and ``litpapers discover ...`` (see :data:`TOOLS`), each with a quiet console
    (:func:`training.console.quiet_console`)."""
    quiet_console()
    if len(sys.argv) > 1 and sys.argv[1] in TOOLS:
        sys.exit(run_tool(sys.argv[1], sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        print("litpapers: Lightning subcommands below, plus\n" + "\n".join(
            f"  {name:<12}{text}  (litpapers {name} --help)" for name, text in TOOLS.items()) + "\n")
    from training import cli as training_cli

    training_cli.main()


def __getattr__(name: str):
    """The names of :mod:`training.cli` re-exported (``cli.build_cli``, ``cli.LitPapersCLI``, ``cli.EXIT_INTERRUPTED``,
    ...), imported on first use so that ``reproduce`` and ``discover`` do not load Lightning's CLI."""
    from training import cli as training_cli

    return getattr(training_cli, name)


if __name__ == "__main__":
    main()
