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


def test_readme_demo_numbers_are_the_committed_results(backend):
    """Every number the README quotes from the demo is generated from figures/results.json."""
    if backend.name != "numpy":
        pytest.skip("reads files only")
    import json

    from miniresnet.experiments.report import readme_section

    root = README.parent
    results = json.loads((root / "figures" / "results.json").read_text())
    text = README.read_text()
    block = re.search(r"<!-- demo-results:begin -->\n(.*?)<!-- demo-results:end -->", text,
                      flags=re.S)
    assert block, "README has no demo-results block"
    assert block.group(1) == readme_section(results)
    for figure in re.findall(r"\]\((figures/[^)]+)\)", block.group(1)):
        assert (root / figure).is_file(), figure
    assert results["scale"] == "default"


def test_figures_readme_lists_every_committed_figure(backend):
    if backend.name != "numpy":
        pytest.skip("reads files only")
    folder = README.parent / "figures"
    listed = (folder / "README.md").read_text()
    for png in sorted(folder.glob("*.png")):
        assert f"[`{png.name}`]({png.name})" in listed, png.name
