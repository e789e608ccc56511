"""The run directory shared by every suite: provenance, append-only rows, torn-line recovery, settings checks."""

from __future__ import annotations

import json

import pytest

from evals.core.errors import RunDirError
from evals.core.store import RunDir, provenance


def _new(tmp_path, settings=None):
    settings = settings or {"lengths": [1024], "depths": [0.0, 50.0]}
    rd = RunDir(tmp_path / "run")
    assert rd.open("needle", settings, "cfg1", resume=False) == {}
    rd.write_run(provenance("needle", settings, "cfg1", {"name": "default"}))
    return rd


def test_provenance_records_code_versions_and_settings(tmp_path):
    rd = _new(tmp_path)
    run = rd.read_run()
    assert run["suite"] == "needle" and run["config"] == "cfg1" and run["settings"]["lengths"] == [1024]
    assert run["git"]["commit"] and isinstance(run["git"]["dirty"], bool)
    assert run["versions"]["torch"] and run["versions"]["python"]


def test_rows_append_and_a_torn_last_line_is_cut_on_resume(tmp_path, capsys):
    rd = _new(tmp_path)
    rd.append({"cell_id": "a", "found": True})
    rd.append({"cell_id": "b", "found": False})
    with open(rd.results_path, "a") as f:
        f.write('{"cell_id": "c", "fou')  # killed mid-write
    done = RunDir(tmp_path / "run").open("needle", {"lengths": [1024], "depths": [0.0, 50.0]}, "cfg1", resume=True)
    assert set(done) == {"a", "b"}
    assert "torn last line" in capsys.readouterr().err
    rd.append({"cell_id": "c", "found": True})
    assert [json.loads(x)["cell_id"] for x in rd.results_path.read_text().splitlines()] == ["a", "b", "c"]


def test_existing_run_is_never_overwritten_without_resume(tmp_path):
    rd = _new(tmp_path)
    rd.append({"cell_id": "a"})
    with pytest.raises(RunDirError, match="already holds a run; pass --resume"):
        RunDir(tmp_path / "run").open("needle", {"lengths": [1024]}, "cfg1", resume=False)
    assert rd.results_path.read_text().count("\n") == 1


def test_resume_under_other_settings_names_what_differs(tmp_path):
    rd = _new(tmp_path)
    rd.append({"cell_id": "a"})
    with pytest.raises(RunDirError, match=r"other settings \(differ: depths\)"):
        RunDir(tmp_path / "run").open("needle", {"lengths": [1024], "depths": [0.0]}, "cfg2", resume=True)
    assert rd.results_path.read_text().count("\n") == 1


def test_resume_into_a_foreign_non_empty_folder_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty and has no run.json"):
        RunDir(tmp_path / "x").open("needle", {}, "cfg", resume=True)
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"


def _git(where, *args):
    import subprocess

    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=where, check=True,
                   capture_output=True)


def test_git_state_never_claims_a_commit_it_does_not_have(tmp_path):
    """Outside a checkout, in a repo without commits, or untracked inside another repo: commit and dirty null;
    tracked: the commit, and dirty once a tracked file changes."""
    from evals.core.store import git_state

    code = tmp_path / "store.py"
    code.write_text("x = 1\n")
    assert git_state(code) == {"commit": None, "dirty": None, "source": None}
    _git(tmp_path, "init", "-q")
    assert git_state(code)["commit"] is None and git_state(code)["dirty"] is None  # no commit yet
    (tmp_path / "other.txt").write_text("o")
    _git(tmp_path, "add", "other.txt")
    _git(tmp_path, "commit", "-qm", "other")
    assert git_state(code)["commit"] is None and git_state(code)["dirty"] is None  # untracked in another repo
    _git(tmp_path, "add", "store.py")
    _git(tmp_path, "commit", "-qm", "code")
    state = git_state(code)
    assert len(state["commit"]) == 40 and state["dirty"] is False and state["source"] == "checkout"
    code.write_text("x = 2\n")
    assert git_state(code)["dirty"] is True


def test_an_installed_package_reports_the_commit_pip_recorded(tmp_path, monkeypatch):
    """Installed from a git URL, pip writes the commit into direct_url.json (PEP 610): that is the commit, with
    dirty unknown; installed from a directory (no vcs_info): commit and dirty null, never a guess."""
    from evals.core.store import installed_commit

    dist = tmp_path / "ragkit_probe-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ragkit-probe\nVersion: 1.0\n")
    (dist / "direct_url.json").write_text(json.dumps(
        {"url": "https://example.org/ragkit.git", "vcs_info": {"vcs": "git", "commit_id": "ab" * 20}}))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert installed_commit("ragkit-probe") == {"commit": "ab" * 20, "dirty": None, "source": "installed package"}
    (dist / "direct_url.json").write_text(json.dumps({"url": "file:///src/ragkit", "dir_info": {"editable": True}}))
    assert installed_commit("ragkit-probe") == {"commit": None, "dirty": None, "source": None}
