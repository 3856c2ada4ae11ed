"""The sample templates, config and leads that ship inside the package.

They are the repository's top-level `templates/` and `config/` folders, mapped into the
package when a wheel is built (pyproject.toml), so `twoway demo` and `twoway init` work
from an installed wheel or the container image as well as from a checkout (an editable
install reads the checkout's folders themselves: one copy, no drift).
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

SAMPLE_DIRS = ("templates", "config")
_CHECKOUT = Path(__file__).resolve().parent.parent.parent


class SamplesMissing(Exception):
    """The installation has no sample files (a broken or partial install)."""


def sample_dir(name: str) -> Traversable:
    """The packaged folder `name` ("templates" or "config"), else the checkout's own."""
    if name not in SAMPLE_DIRS:
        raise ValueError(f"no sample folder {name!r}")
    packaged = resources.files(__name__) / name
    if packaged.is_dir():
        return packaged
    checkout = _CHECKOUT / name
    if (_CHECKOUT / "pyproject.toml").is_file() and checkout.is_dir():
        return checkout
    raise SamplesMissing(
        f"this installation of twoway has no sample {name} (looked in {packaged} and "
        f"{checkout}); reinstall it from a wheel or a checkout"
    )


def copy_tree(source: Traversable, target: Path) -> list[Path]:
    """Copy every file under `source` into `target` (created); returns the files written.

    Never overwrites: a file that already exists is left as it is and not returned.
    """
    written: list[Path] = []
    target.mkdir(parents=True, exist_ok=True)
    for entry in sorted(source.iterdir(), key=lambda e: e.name):
        if entry.name.startswith((".", "__")):
            continue
        dest = target / entry.name
        if entry.is_dir():
            written += copy_tree(entry, dest)
        elif not dest.exists():
            dest.write_bytes(entry.read_bytes())
            written.append(dest)
    return written


def init_project(directory: Path) -> list[Path]:
    """Write a starting point into `directory`: config/twoway.yaml (from the example),
    config/sample-leads.csv and templates/. Returns the files written.

    Raises FileExistsError when `directory` already holds a twoway.yaml or templates/:
    a starting point never overwrites someone's work.
    """
    config = directory / "config"
    templates = directory / "templates"
    for existing in (config / "twoway.yaml", templates):
        if existing.exists():
            raise FileExistsError(f"{existing} already exists; choose an empty folder")
    config.mkdir(parents=True, exist_ok=True)
    samples = sample_dir("config")
    written = []
    for src, dest in (
        ("twoway.example.yaml", "twoway.yaml"),
        ("twoway.example.yaml", "twoway.example.yaml"),
        ("sample-leads.csv", "sample-leads.csv"),
    ):
        path = config / dest
        if not path.exists():
            path.write_bytes((samples / src).read_bytes())
            written.append(path)
    written += copy_tree(sample_dir("templates"), templates)
    return written
