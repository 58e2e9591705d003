"""Packaging: pyproject.toml lists every package of the source tree, and the wheel check that
CI runs (.ci/wheel, .ci/check_wheel.py) catches a module or data file the wheel lacks."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / ".ci" / "check_wheel.py"


@pytest.fixture(autouse=True)
def once(backend):
    """Nothing here depends on the array backend: run once."""
    if backend.name != "numpy":
        pytest.skip("packaging does not depend on the backend")


def test_pyproject_lists_every_package_folder():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = set()
    for package, folder in setuptools["package-dir"].items():
        for path in (ROOT / folder).rglob("*"):
            rel = path.relative_to(ROOT / folder)
            if path.is_file() and "__pycache__" not in rel.parts:  # modules and data alike
                folders.add(".".join((package, *rel.parent.parts)))
    assert sorted(setuptools["packages"]) == sorted(folders)


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


SOURCE = {
    "pyproject.toml": """
        [project]
        name = "fakepkg"
        dependencies = ["numpy>=2"]
        [project.optional-dependencies]
        extra = ["not-installed-anywhere>=1", "numpy"]
        [tool.setuptools]
        package-dir = { "fakepkg" = "fakepkg", "fakepkg.plugins" = "plugins" }
        packages = ["fakepkg", "fakepkg.sub", "fakepkg.data", "fakepkg.plugins"]
        """,
    "fakepkg/__init__.py": "",
    "fakepkg/a.py": "import numpy\n",
    "fakepkg/sub/__init__.py": "",
    "fakepkg/sub/b.py": "",
    "fakepkg/data/table.npz": "data",
    "plugins/__init__.py": "",
    "plugins/opt.py": "import not_installed_anywhere\n",  # needs an optional dependency
}
# how the source above is installed: plugins/ becomes fakepkg/plugins/
INSTALLED = {name.replace("plugins/", "fakepkg/plugins/"): text for name, text in SOURCE.items()
             if name != "pyproject.toml"}


def _check(tmp_path: Path, installed: dict[str, str]) -> subprocess.CompletedProcess:
    source = _write(tmp_path / "source", SOURCE)
    site = _write(tmp_path / "site", installed)
    (tmp_path / "elsewhere").mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, str(CHECK), str(source)], cwd=tmp_path / "elsewhere",
                          env=env, capture_output=True, text=True, timeout=60)


def test_check_wheel_passes_a_complete_install(tmp_path):
    result = _check(tmp_path, INSTALLED)
    assert result.returncode == 0, result.stderr
    assert "fakepkg.plugins.opt needs the optional not_installed_anywhere" in result.stdout
    assert "all 6 modules and 1 data files installed" in result.stdout


@pytest.mark.parametrize("change, message", [
    ({"fakepkg/sub/__init__.py": None, "fakepkg/sub/b.py": None},
     "not installed: module fakepkg.sub.b"),
    ({"fakepkg/data/table.npz": None}, "not installed: data file fakepkg/data/table.npz"),
    ({"fakepkg/stale.py": ""}, "installed but not in the source tree: module fakepkg.stale"),
    ({"fakepkg/a.py": "import numpy_not_declared\n"},
     "cannot import fakepkg.a: ModuleNotFoundError"),
    ({"fakepkg/sub/__init__.py": "raise RuntimeError('boom')\n"},
     "cannot import fakepkg.sub: RuntimeError('boom')"),
])
def test_check_wheel_names_what_the_install_lacks(tmp_path, change, message):
    installed = {k: v for k, v in {**INSTALLED, **change}.items() if v is not None}
    result = _check(tmp_path, installed)
    assert result.returncode == 1
    assert f"check_wheel: {message}" in result.stderr, result.stderr


def test_check_wheel_rejects_the_source_tree_itself(tmp_path):
    source = _write(tmp_path / "source", SOURCE)
    env = {**os.environ, "PYTHONPATH": str(source)}  # fakepkg/ imported from the checkout
    result = subprocess.run([sys.executable, str(CHECK), str(source)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "fakepkg is imported from the source tree" in result.stderr
