"""Package layout only (metadata lives in pyproject.toml).

The library is ``cscr/``; the application folders beside it install under its namespace:
``cli/`` as ``cscr.cli``, ``jobs/`` as ``cscr.jobs``, ``serve/`` as ``cscr.serve``. Nothing named
``jobs`` or ``serve`` lands at the top of site-packages.
"""

from setuptools import find_packages, setup

APPS = {"cscr.cli": "cli", "cscr.jobs": "jobs", "cscr.serve": "serve"}


def packages() -> list[str]:
    found = find_packages(include=["cscr", "cscr.*"])
    for name, folder in APPS.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(where=folder)]
    return found


setup(packages=packages(), package_dir={"": ".", **APPS})
