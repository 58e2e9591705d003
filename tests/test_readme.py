"""The README's Python examples run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_example_runs(backend, index, tmp_path, monkeypatch):
    if backend.name != "numpy":
        pytest.skip("the README examples use NumPy host arrays with the default backend")
    monkeypatch.chdir(tmp_path)  # examples may write files
    blocks = python_blocks()
    namespace: dict = {}
    exec(compile("\n".join(blocks[: index + 1]), f"README block {index}", "exec"), namespace)
