"""Every package folder in the tree is installed: the explicit list in pyproject.toml must
name each one (``modalities/`` installs as ``multidiff.modalities``)."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _packages_on_disk() -> set[str]:
    found = set()
    for top, name in (("multidiff", "multidiff"), ("modalities", "multidiff.modalities")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    return found


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    missing = _packages_on_disk() - listed
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"
    stale = listed - _packages_on_disk()
    assert not stale, f"pyproject.toml lists packages that do not exist: {sorted(stale)}"
