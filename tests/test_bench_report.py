"""`tpext bench` without its optional plotting dependency: checked before any work, and the JSON is
still written, with the plot reported as skipped."""

from __future__ import annotations

import json

from tpext.commands import bench


def test_can_plot_follows_whether_matplotlib_is_importable(monkeypatch):
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None)
    assert not bench._can_plot()


def test_without_matplotlib_the_json_is_written_and_the_plot_skipped(tmp_path):
    report = {"format": "tpext-bench-layers/1", "results": []}
    message = bench._write_report(report, str(tmp_path / "out"), "title", plot=False)
    assert json.loads((tmp_path / "out" / "layers.json").read_text()) == report
    assert not (tmp_path / "out" / "layers.png").exists()
    assert "plot skipped (matplotlib is not installed)" in message
