"""The environment the tests run in is the one uv.lock pins: every locked package that applies to this
platform and Python is installed at exactly the locked version, and pyproject.toml's floors admit it."""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata

from conftest import REPO
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version


def _locked() -> dict[str, list[dict]]:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    by_name: dict[str, list[dict]] = {}
    for pkg in lock["package"]:
        by_name.setdefault(canonicalize_name(pkg["name"]), []).append(pkg)
    return by_name


def _applies(pkg: dict) -> bool:
    """A locked version applies here when one of its resolution markers (if any) holds."""
    markers = pkg.get("resolution-markers")
    return not markers or any(Marker(m).evaluate() for m in markers)


def _installed() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}


def test_every_installed_locked_package_has_its_locked_version():
    installed = _installed()
    wrong, checked = [], 0
    for name, versions in _locked().items():
        here = [p for p in versions if _applies(p)]
        if name not in installed or not here or "editable" in here[0]["source"] or "virtual" in here[0]["source"]:
            continue
        checked += 1
        if installed[name] not in {p["version"] for p in here}:
            wrong.append(f"{name} {installed[name]} (locked {here[0]['version']})")
    assert not wrong, f"installed versions differ from uv.lock: {wrong}; run `make venv`"
    assert checked > 50  # the lock's whole set, not a handful: torch, transformers, sae-lens, nnsight, ...


def test_the_direct_dependencies_are_installed_at_their_locked_versions():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    locked = _locked()
    installed = _installed()
    for dep in deps:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        here = [p for p in locked[name] if _applies(p)]
        assert len(here) == 1, f"{name}: one locked version expected for Python {sys.version_info[:2]}"
        version = here[0]["version"]
        assert installed.get(name) == version, f"{name}: installed {installed.get(name)}, locked {version}"
        # The declared floor is what CI tests: the locked version satisfies it and shares its release series.
        assert req.specifier.contains(version), f"{dep} does not admit the locked {version}"
        floors = [s.version for s in req.specifier if s.operator in (">=", "==")]
        assert floors, f"{dep}: no floor declared"
        floor, got = Version(floors[0]), Version(version)
        assert (got.major, got.minor) == (floor.major, floor.minor), \
            f"{dep}: the floor {floor} is below the tested {version}; raise it (README: Installing)"


def test_one_version_of_each_package_for_every_python_the_lock_covers():
    duplicated = sorted(name for name, versions in _locked().items() if len(versions) > 1)
    assert not duplicated, f"uv.lock forks {duplicated} by Python version; constrain them in [tool.uv]"
