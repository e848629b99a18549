"""Results files: the RESULTS.md shape, and the commit they name."""

import json

from eval.results import git_commit, write_results


def test_results_file_shape_and_append(tmp_path):
    path = tmp_path / "r.json"
    write_results(path, [{"model": "a", "accuracy": 0.5}], "cpu", notes="first")
    write_results(path, [{"model": "b", "accuracy": 0.75}], "cpu", notes="second", append=True)
    record = json.loads(path.read_text())
    assert set(record) == {"command", "git_commit", "device", "date", "notes", "rows"}
    assert [r["model"] for r in record["rows"]] == ["a", "b"]
    assert all(r["device"].startswith("cpu") and r["command"] for r in record["rows"])
    assert record["notes"] == "first second"


def test_commit_from_the_environment_wins(monkeypatch):
    monkeypatch.setenv("DISTILL_GIT_COMMIT", "abc123")
    assert git_commit() == "abc123"
    monkeypatch.delenv("DISTILL_GIT_COMMIT")
    assert git_commit() != "abc123"
