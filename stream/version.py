"""The trigfarm version: derived from git at install time (setuptools-scm), read from the
installed package metadata.

It is stamped in every flow snapshot (``models.snapshot``) and every run report
(``deploy.report``). With no release tag it reads ``0.1.1.devN+g<commit>`` (N commits,
``.d<date>`` when the tree had uncommitted changes). An editable install keeps the version
of the commit it was installed at (reinstall to update it); a copy of the tree installed
without git reads ``0.1.0``.

Example:
    >>> from stream.version import version
    >>> version() != ""
    True
"""

from __future__ import annotations

from importlib import metadata

UNKNOWN = "unknown"


def version() -> str:
    """The installed trigfarm version, or ``"unknown"`` when trigfarm is not installed (the
    code is run from a bare copy of the tree)."""
    try:
        return metadata.version("trigfarm")
    except metadata.PackageNotFoundError:
        return UNKNOWN
