"""CI: check an installed, non-editable package against the source tree it was built from.

Usage: ``python check_wheel.py SOURCE_ROOT``, run by the interpreter of the venv that holds the
wheel, from a folder outside SOURCE_ROOT (so that the source cannot shadow the installed copy).

pyproject.toml lists the packages explicitly, and an editable install imports them from the
source tree whatever the list says. So: every module and data file under the folders of
``[tool.setuptools] package-dir`` must be installed (walked with ``pkgutil``), nothing else
must be, the package must come from outside SOURCE_ROOT, and every module must import (or
fail only for want of a package declared solely in ``[project.optional-dependencies]``).
Exits with status 1 and one line per problem otherwise.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys
from pathlib import Path

import tomllib


def optional_imports(config: dict) -> set[str]:
    """Import names of the packages that pyproject declares only as optional dependencies."""
    def names(requirements: list[str]) -> set[str]:
        return {re.match(r"[A-Za-z0-9._-]+", r)[0].lower().replace("-", "_") for r in requirements}

    project = config["project"]
    extras = set().union(*map(names, project.get("optional-dependencies", {}).values()))
    return extras - names(project.get("dependencies", []))


def expected(root: Path) -> tuple[str, set[str], set[str]]:
    """The top-level package, its module names and its data files (paths relative to the folder
    holding the top-level package) in the source tree at ``root``."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    package_dir: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    (top,) = [p for p in package_dir if "." not in p]
    modules: set[str] = set()
    data: set[str] = set()
    for package, folder in package_dir.items():
        base = root / folder
        for path in base.rglob("*"):
            rel = path.relative_to(base)
            if path.is_dir() or "__pycache__" in rel.parts:
                continue
            parts = (*package.split("."), *rel.parts)
            if path.suffix == ".py":
                name = parts[:-1] if rel.name == "__init__.py" else (*parts[:-1], path.stem)
                modules.add(".".join(name))
            else:
                data.add("/".join(parts))
    return top, modules, data


def problems(root: Path) -> list[str]:
    """What is wrong with the installed copy of the package built from ``root``."""
    top, modules, data = expected(root)
    package = importlib.import_module(top)
    location = Path(package.__file__).resolve().parent
    if location.is_relative_to(root.resolve()):
        return [f"{top} is imported from the source tree ({location}), not from the wheel"]
    errors: list[str] = []

    def failed(name: str) -> None:  # walk_packages could not import this subpackage
        errors.append(f"cannot import {name}: {sys.exc_info()[1]!r}")

    found = {top} | {m.name for m in pkgutil.walk_packages(package.__path__, top + ".", failed)}
    errors += [f"not installed: module {m}" for m in sorted(modules - found)]
    errors += [f"installed but not in the source tree: module {m}" for m in sorted(found - modules)]
    optional = optional_imports(tomllib.loads((root / "pyproject.toml").read_text()))
    for name in sorted(found & modules):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:  # allowed if it needs an optional dependency
            if (exc.name or "").partition(".")[0] not in optional:
                errors.append(f"cannot import {name}: {exc!r}")
            else:
                print(f"check_wheel: {name} needs the optional {exc.name}, not installed")
        except Exception as exc:
            errors.append(f"cannot import {name}: {exc!r}")
    errors += [f"not installed: data file {f}" for f in sorted(data)
               if not (location.parent / f).is_file()]
    return list(dict.fromkeys(errors))  # a package that fails is met twice


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python check_wheel.py SOURCE_ROOT", file=sys.stderr)
        return 2
    root = Path(argv[0])
    errors = problems(root)
    for e in errors:
        print(f"check_wheel: {e}", file=sys.stderr)
    if not errors:
        top, modules, data = expected(root)
        print(f"check_wheel: {top} from {importlib.import_module(top).__file__}: "
              f"all {len(modules)} modules and {len(data)} data files installed")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
