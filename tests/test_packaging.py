"""Packaging: the pyproject's dependencies and extras, the missing-extra error, and (slow) a non-editable install."""

import os
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # the test extra installs tomli on Python 3.10
    import tomli as tomllib

from lm.extras import EXTRAS, require

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def names(requirements: list[str]) -> set[str]:
    """Distribution names (with extras) of requirement strings: 'minari[hdf5]>=0.5' -> 'minari[hdf5]'."""
    out = set()
    for r in requirements:
        for sep in ("<", ">", "=", "!", "~", ";", " "):
            r = r.split(sep, 1)[0]
        out.add(r.strip().lower())
    return out


def floor(requirements: list[str], name: str) -> tuple[int, ...]:
    spec = next(r for r in requirements if r.split("[")[0].split(">")[0].strip().lower() == name)
    return tuple(int(x) for x in spec.split(">=", 1)[1].split(",")[0].strip().split("."))


def test_core_dependencies_and_extras():
    project = pyproject()["project"]
    core = names(project["dependencies"])
    assert {"lightning", "torch", "transformers", "torchmetrics[text]", "tensorboard",
            "jsonargparse[signatures]", "matplotlib", "rich", "filelock"} <= core
    # what only some papers need is not in the core install; Rouge-L comes from torchmetrics[text], not nltk
    assert not core & {"nltk", "torchao", "gymnasium[mujoco]", "minari[hdf5]", "h5py", "datasets", "trl"}
    extras = {k: names(v) for k, v in project["optional-dependencies"].items()}
    assert extras["rl"] == {"gymnasium[mujoco]", "minari[hdf5]", "h5py"}
    assert extras["quant"] == {"torchao"}
    assert extras["data"] == {"datasets"}
    assert extras["bench"] == {"trl", "pytorch-optimizer"}
    assert {"pytest", "pytest-timeout"} <= extras["test"]
    assert set(EXTRAS) <= set(extras)  # every extra the error message can name exists


def test_version_floors_cover_the_apis_used():
    project = pyproject()["project"]
    # from_pretrained(dtype=...) appeared in transformers 4.56 (huggingface/transformers#39782)
    assert floor(project["dependencies"], "transformers") >= (4, 56)
    # IntxWeightOnlyConfig -> IntxUnpackedToInt8Tensor by default from torchao 0.14
    assert floor(project["optional-dependencies"]["quant"], "torchao") >= (0, 14)


def test_make_pins_every_dependency_to_one_version():
    """``make`` installs with ``-c constraints.txt``, which pins every dependency and extra (but torch, chosen by
    TORCH_SPEC) to one version: results must not change with whatever PyPI serves that day."""
    assert '-c constraints.txt' in (ROOT / "Makefile").read_text()
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            pins[name.strip().lower().replace("_", "-")] = version
    project = pyproject()["project"]
    wanted = names(project["dependencies"]) | {n for v in project["optional-dependencies"].values() for n in names(v)}
    wanted = {n.split("[")[0] for n in wanted if not n.startswith("litpapers")} - {"torch", "tomli"}
    assert wanted <= set(pins), f"not pinned: {sorted(wanted - set(pins))}"
    assert "torch" not in pins


def test_license_metadata_and_installed_packages():
    data = pyproject()
    assert data["project"]["license"] == "Apache-2.0"  # an SPDX string, not the deprecated table
    setuptools_req = next(r for r in data["build-system"]["requires"] if r.startswith("setuptools"))
    assert floor([setuptools_req], "setuptools") >= (77,)  # first setuptools that reads SPDX license strings
    include = data["tool"]["setuptools"]["packages"]["find"]["include"]
    # every floor is a package, the claim code behind `litpapers reproduce` too (reached by a plain import)
    assert {"lit_modules*", "datamodules*", "callbacks*", "optimizers*", "training*", "benchmarks*"} <= set(include)


def test_require_returns_the_module_or_names_the_extra():
    import json

    assert require("json", "data") is json
    with pytest.raises(ModuleNotFoundError) as err:
        require("litpapers_no_such_module", "rl")
    assert "pip install 'litpapers[rl]'" in str(err.value) and "litpapers_no_such_module" in str(err.value)
    assert isinstance(err.value.__cause__, ModuleNotFoundError)
    with pytest.raises(ValueError, match="extra must be one of"):
        require("json", "everything")


def hide(monkeypatch, *packages: str) -> None:
    """Make ``import`` of each package (and of its already imported submodules) fail as if not installed."""
    for name in list(sys.modules):
        if name.split(".")[0] in packages:
            monkeypatch.setitem(sys.modules, name, None)
    for name in packages:
        monkeypatch.setitem(sys.modules, name, None)


def missing_extra_message(fn) -> str:
    with pytest.raises(ModuleNotFoundError) as err:
        fn()
    return str(err.value)


def test_missing_extra_at_the_point_of_use_names_the_install(monkeypatch, tmp_path):
    """RADT data without gymnasium/minari/h5py, QDPO without torchao, a saved HF dataset without datasets: each
    stops with the ModuleNotFoundError naming `pip install 'litpapers[<extra>]'` (the fast twin of the slow test
    below, hiding the packages in this environment instead of installing without them)."""
    from datamodules import OfflineRLDataModule, TextDataModule
    from lit_modules import QDPO

    monkeypatch.setenv("LITPAPERS_CACHE", str(tmp_path / "cache"))  # the built-in dataset is not cached
    hide(monkeypatch, "gymnasium", "minari", "h5py", "torchao", "datasets")
    rl = OfflineRLDataModule(dataset="litpapers/halfcheetah/scripted-v0")
    assert "pip install 'litpapers[rl]'" in missing_extra_message(lambda: rl.setup("fit"))
    hdf5 = tmp_path / "d4rl.hdf5"
    hdf5.write_bytes(b"")
    assert "pip install 'litpapers[rl]'" in missing_extra_message(
        lambda: OfflineRLDataModule(dataset=str(hdf5)).setup("fit"))
    tiny = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
            "intermediate_size": 64}
    assert "pip install 'litpapers[quant]'" in missing_extra_message(lambda: QDPO(model=tiny).configure_model())
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_info.json").write_text("{}")
    text = TextDataModule(path=str(saved))
    assert "pip install 'litpapers[data]'" in missing_extra_message(lambda: (text.prepare_data(), text.setup("fit")))


@pytest.fixture(scope="module")
def core_install(tmp_path_factory) -> Path:
    """A fresh virtual environment with `pip install .` (not editable, core dependencies only). Takes minutes."""
    env_dir = tmp_path_factory.mktemp("core") / "venv"
    venv.create(env_dir, with_pip=True)
    subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", str(ROOT)], check=True,
                   timeout=1700)
    return env_dir


def run_outside_checkout(env_dir: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    clean_env.update(LITPAPERS_CACHE=str(cwd / "cache"), HF_HUB_OFFLINE="1")  # nothing generated earlier is reused
    return subprocess.run([str(env_dir / "bin" / "python"), "-c", textwrap.dedent(code)], cwd=cwd, env=clean_env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_non_editable_install_imports_every_module(core_install, tmp_path):
    """Every module imports from the installed copy, outside the checkout, with no extra installed; the console
    script starts, and `litpapers reproduce` (which runs the configs of a source checkout) says where to run it."""
    out = run_outside_checkout(core_install, """
        import importlib
        for name in ["cli", "optimizers", "lit_modules", "datamodules", "callbacks", "training", "discovery",
                     "benchmarks", "datamodules.contract", "lm.extras"]:
            module = importlib.import_module(name)
            assert "site-packages" in module.__file__, (name, module.__file__)
        print("ok")
    """, tmp_path)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
    help_out = subprocess.run([str(core_install / "bin" / "litpapers"), "--help"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
    assert help_out.returncode == 0, help_out.stderr[-3000:]
    reproduce = subprocess.run([str(core_install / "bin" / "litpapers"), "reproduce", "--quick"], cwd=tmp_path,
                               capture_output=True, text=True, timeout=600)
    assert reproduce.returncode == 2 and "runs from a source checkout" in reproduce.stderr, reproduce.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_core_install_names_the_missing_extra(core_install, tmp_path):
    """A paper whose extra is missing stops with one error naming `pip install 'litpapers[<extra>]'`."""
    out = run_outside_checkout(core_install, """
        import os
        from datamodules import OfflineRLDataModule, TextDataModule
        from lit_modules import QDPO

        def message(fn):
            try:
                fn()
            except ModuleNotFoundError as err:
                return str(err)
            return "no error"

        os.makedirs("saved", exist_ok=True)
        open("saved/dataset_info.json", "w").write("{}")
        text = TextDataModule(path="saved")
        rl = OfflineRLDataModule(dataset="litpapers/halfcheetah/scripted-v0")
        print(message(lambda: (rl.prepare_data(), rl.setup("fit"))))
        print(message(lambda: QDPO(model={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                          "num_key_value_heads": 2, "intermediate_size": 64}).configure_model()))
        print(message(lambda: (text.prepare_data(), text.setup("fit"))))
    """, tmp_path)
    lines = out.stdout.strip().splitlines()[-3:]
    assert len(lines) == 3, out.stderr[-3000:]
    for line, extra in zip(lines, ["rl", "quant", "data"]):
        assert f"pip install 'litpapers[{extra}]'" in line, line
