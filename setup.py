"""The package list, found rather than written out: a subpackage added to sparsebench/ is
installed without anyone remembering to list it (tests/test_layout.py checks the wheel).
Everything else is declared in pyproject.toml."""

from setuptools import find_packages, setup

# The shipped suites live at the top level (suites/) and install as sparsebench.suites
# (pyproject.toml's package-dir), so find_packages cannot see them.
setup(packages=[*find_packages(include=["sparsebench", "sparsebench.*"]), "sparsebench.suites"])
