"""Metrics: JSONL rows with a step field, and plots of one or several runs."""

import json
import os
import sys

import numpy as np
import pytest

from jaxrl_llm import metrics
from jaxrl_llm.errors import ConfigError, DataError


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


def test_tensorboard_when_listed(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "tensorboardX", None)
        with pytest.raises(ConfigError, match=r"tensorboardX package: pip install 'jaxrl_llm\[tensorboard\]'"):
            metrics.MetricsWriter(str(tmp_path / "without"), trackers=("jsonl", "tensorboard"))
    writer = metrics.MetricsWriter(str(tmp_path / "run"), trackers=("tensorboard",), config={"seed": 7})
    writer.write(0, {"loss": 1.5, "reward/mean": 0.25})
    writer.close()
    writer.close()  # closing twice does nothing
    events = os.listdir(tmp_path / "run" / "tensorboard")
    assert len(events) == 1 and events[0].startswith("events.out.tfevents")
    content = (tmp_path / "run" / "tensorboard" / events[0]).read_bytes()
    assert b"reward/mean" in content and b"loss" in content and b"seed" in content


def test_a_resumed_writer_keeps_the_earlier_rows_on_disk_at_once(tmp_path):
    """A resumed run killed before its first new step used to lose the rows it rewrote (they sat in a
    buffer); the kept rows are on disk as soon as the writer exists, and a torn last line is dropped."""
    writer = metrics.MetricsWriter(str(tmp_path))
    for step in range(5):
        writer.write(step, {"loss": float(step)})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as file:
        file.write('{"step": 5, "lo')  # a crash mid-line
    resumed = metrics.MetricsWriter(str(tmp_path), start_step=3)  # the checkpoint holds steps 0-2
    assert [row["step"] for row in metrics.read_metrics(str(tmp_path))] == [0, 1, 2]  # before any write or close
    resumed.write(3, {"loss": 3.5})
    assert [row["loss"] for row in metrics.read_metrics(str(tmp_path))] == [0.0, 1.0, 2.0, 3.5]
    resumed.close()
    assert not list(tmp_path.glob("*.partial"))


def test_a_torn_file_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, "lo\n{"step": 2}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl line 2 is not a JSON object; fix or delete that line"):
        metrics.read_metrics(str(tmp_path))
    (tmp_path / "summary.json").write_text('{"loss": 0.')
    with pytest.raises(DataError, match=r"summary.json is not valid JSON; delete it"):
        metrics.read_summary(str(tmp_path))
