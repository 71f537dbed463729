"""The notebooks in notebooks/ run top to bottom, and are kept in git without outputs.

Each notebook is executed with nbclient in a Jupyter kernel that runs this very interpreter (the
venv's python, whatever kernels the machine has registered), against a SQLite store built in a
temporary directory the way the notebooks build their demo store (simulate, import, project)
and named by WORKITEM_STORE_URL, which the kernel inherits from this process's environment.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from store.db import URL_ENV, open_store
from store.ingest.files import import_lines
from store.projections.runner import project
from store.simulate import simulate

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
EXPECTED = ["01_workitem_lifecycle.ipynb", "02_audit_investigation.ipynb", "03_request_outcomes.ipynb"]
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL = "workitem-store-tests"
CELL_TIMEOUT = 120  # seconds; a notebook takes a few seconds in all


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    """A kernelspec whose kernel is ``sys.executable``, found first through JUPYTER_PATH.

    Registered kernels named python3 may belong to any interpreter (a user-level kernelspec
    wins over the venv's own); this one cannot, and it leaves the venv and ~/.local untouched.
    """
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python (workitem-store tests)",
        "language": "python",
    }))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(root))
        yield KERNEL


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    """A fresh SQLite store with the notebooks' demo data: 20,000 simulated notifications."""
    path = tmp_path_factory.mktemp("store") / "workitems.db"
    engine = open_store(f"sqlite:///{path}")
    import_lines(engine, simulate(20_000, agents=20, seed=7, noise_rate=0.002),
                 source="simulate", file_name="demo-seed-7.jsonl")
    project(engine)
    engine.dispose()
    return f"sqlite:///{path}"


def execute(path: Path, kernel_name: str, cwd: Path) -> nbformat.NotebookNode:
    """Run every cell of the notebook in a new kernel started in ``cwd``; raise on any error.

    A last cell added here reports the kernel's interpreter, to prove which python ran it.
    """
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)"))
    client = NotebookClient(nb, kernel_name=kernel_name, timeout=CELL_TIMEOUT,
                            resources={"metadata": {"path": str(cwd)}})
    client.execute()  # CellExecutionError (with the cell's traceback) on the first failing cell
    assert nb.cells[-1].outputs[0]["text"].strip() == sys.prefix, "the kernel ran another python"
    return nb


def test_the_three_notebooks_exist():
    assert set(EXPECTED) <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, kernel_name, store_url, tmp_path, monkeypatch):
    monkeypatch.setenv(URL_ENV, store_url)
    execute(path, kernel_name, cwd=tmp_path)
    # With WORKITEM_STORE_URL set, the notebook used that store and built no demo store.
    assert not (tmp_path / "workitems-demo.db").exists()


def test_without_url_a_notebook_builds_its_demo_store(kernel_name, tmp_path, monkeypatch):
    monkeypatch.delenv(URL_ENV, raising=False)
    execute(NOTEBOOK_DIR / "03_request_outcomes.ipynb", kernel_name, cwd=tmp_path)
    assert (tmp_path / "workitems-demo.db").is_file()


def _versions_in_git() -> dict[str, str]:
    """Each notebook's text as git holds it (the index), or as on disk when git does not track
    it yet (a new notebook, or no git at all)."""
    versions = {f"notebooks/{p.name}": p.read_text(encoding="utf-8") for p in NOTEBOOKS}
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--", "notebooks/*.ipynb"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        return versions
    for name in filter(None, listed.split("\0")):
        versions[name] = subprocess.run(["git", "show", f":{name}"], cwd=ROOT, capture_output=True,
                                        check=True).stdout.decode("utf-8")
    return versions


def test_notebooks_in_git_have_no_outputs():
    versions = _versions_in_git()
    assert versions
    dirty = []
    for name, source in sorted(versions.items()):
        nb = nbformat.reads(source, as_version=4)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
                dirty.append(f"{name} cell {i}")
    assert not dirty, "strip outputs and execution counts before committing: " + ", ".join(dirty)
