"""Metrics: JSONL rows with a step field, and plots of one or several runs."""

import json
import os
import sys

import numpy as np
import pytest

from jaxrl_llm import metrics
from jaxrl_llm.errors import DataError


def test_jsonl_rows_and_plot(tmp_path):
    runs = []
    for name, slope in (("a", 1.0), ("b", 2.0)):
        run_dir = str(tmp_path / name)
        writer = metrics.MetricsWriter(run_dir)
        for step in range(5):
            writer.write(step, {"reward/mean": np.float32(slope * step), "kl": 0.1})
        writer.close()
        runs.append(run_dir)
    with open(os.path.join(runs[1], "metrics.jsonl")) as file:
        rows = [json.loads(line) for line in file]
    assert rows[3] == {"step": 3, "reward/mean": 6.0, "kl": 0.1}
    out = metrics.plot_runs(runs, str(tmp_path / "cmp.png"))
    assert os.path.getsize(out) > 1000


def test_missing_run_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="metrics.jsonl"):
        metrics.read_metrics(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="none of the metrics"):
        writer = metrics.MetricsWriter(str(tmp_path / "r"))
        writer.write(0, {"other": 1.0})
        writer.close()
        metrics.plot_runs([str(tmp_path / "r")], str(tmp_path / "x.png"))


def test_tensorboard_when_enabled(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "tensorboardX", None)
        with pytest.raises(ImportError, match="train.tensorboard=true needs tensorboardX: pip install tensorboardX"):
            metrics.MetricsWriter(str(tmp_path / "without"), tensorboard=True)
    pytest.importorskip("tensorboardX")
    writer = metrics.MetricsWriter(str(tmp_path / "run"), tensorboard=True)
    writer.write(0, {"loss": 1.5, "reward/mean": 0.25})
    writer.close()
    events = os.listdir(tmp_path / "run" / "tensorboard")
    assert len(events) == 1 and events[0].startswith("events.out.tfevents")
    content = (tmp_path / "run" / "tensorboard" / events[0]).read_bytes()
    assert b"reward/mean" in content and b"loss" in content
