"""Experiment trackers: a tiny run sends the rows of its metrics.jsonl, its config and its final plot to
an offline W&B run, a local trackio project and TensorBoard; a resumed run continues the same runs."""

import glob
import json
import os
import sys
import warnings

import pytest

from jaxrl_llm.config import load_config
from jaxrl_llm.errors import ConfigError
from jaxrl_llm.metrics import MetricsWriter
from jaxrl_llm.run import train
from jaxrl_llm.run.sweep import _checked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=1",
    "model.tiny.head_dim=8", "data.synthetic.num_examples=200", "data.eval_size=8", "data.batch_size=8",
]
ALL = "logging.trackers=[jsonl,tensorboard,wandb,trackio]"


def sft(run_dir, *overrides):
    return load_config(os.path.join(ROOT, "configs", "sft.yaml"),
                       [*TINY, f"run_dir={run_dir}", "train.eval_every=0", "logging.project=trackers_test", *overrides])


def wandb_records(path: str) -> list:
    """The protobuf records of a .wandb file: a 7-byte header, then LevelDB's log format (32 KiB blocks
    of chunks, each a 4-byte CRC, a 2-byte length and a type: 1 whole, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as file:
        data = file.read()
    assert data[:4] == b":W&B"
    pos, block, chunks, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        chunks = chunk if kind in (1, 2) else chunks + chunk
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(chunks))
    return records


def wandb_history(run_dir: str) -> tuple[dict, dict, list[str]]:
    """({step: {metric: value}}, the config, the image files) of every offline W&B session of a run."""
    history, config = {}, {}
    for path in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                history.setdefault(items.pop("_step"), {}).update(items)
            elif kind == "run":
                config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    images = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "files", "media", "images", "*.png"))
    return history, config, images


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as file:
        return [json.loads(line) for line in file]


def test_a_run_logs_the_same_rows_config_and_plot_to_every_tracker_and_resumes_them(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # trackio reads its folder when first imported; nothing else in the tests imports it.
    assert "trackio" not in sys.modules
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    run_dir = str(tmp_path / "run")
    train(sft(run_dir, ALL, "train.total_steps=2"), quiet=True)
    train(sft(run_dir, ALL, "train.total_steps=4", "train.resume=true"), quiet=True)
    logged = rows(run_dir)
    assert [row["step"] for row in logged] == [0, 1, 2, 3]

    history, config, images = wandb_history(run_dir)
    assert len(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))) == 2  # the run and its resumption
    with open(os.path.join(run_dir, "trackers.json")) as file:
        run_id = json.load(file)["wandb"]
    assert all(path.endswith(f"-{run_id}") for path in glob.glob(os.path.join(run_dir, "wandb", "offline-run-*")))
    for row in logged:
        for name in ("loss", "grad_norm", "lr"):
            assert history[row["step"]][name] == pytest.approx(row[name], rel=1e-6), (row["step"], name)
    assert config["algorithm"] == "sft" and config["logging"]["project"] == "trackers_test"
    assert len(images) == 2  # each session's final plot

    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("trackers_test", "run")
    losses = {log["step"]: log["loss"] for log in logs if "loss" in log}
    assert losses == pytest.approx({row["step"]: row["loss"] for row in logged}, rel=1e-6)
    assert sum("plot" in log for log in logs) == 2

    events = glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents*"))
    content = b"".join(open(path, "rb").read() for path in events)
    assert b"loss" in content and b"grad_norm" in content and b"config" in content and b"plot" in content


def test_a_missing_tracker_package_names_the_extra_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"needs the wandb package: pip install 'jaxrl_llm\[wandb\]'"):
        sft(tmp_path, "logging.trackers=[jsonl,wandb]")


def test_wandb_without_a_login_stops_the_run_before_it_trains(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc holding a key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    import wandb

    wandb.teardown()  # W&B keeps the settings of an earlier run in this process (offline, above)
    with pytest.raises(ConfigError, match=r"lists wandb, which could not start a run: .*WANDB_MODE=offline"):
        train(sft(tmp_path / "run", "logging.trackers=[jsonl,wandb]"), quiet=True)
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")
    assert not glob.glob(str(tmp_path / "run" / "checkpoints" / "*"))


def test_a_tracker_failing_mid_run_is_dropped_and_the_rows_kept(tmp_path):
    writer = MetricsWriter(str(tmp_path), trackers=("jsonl", "tensorboard"))
    tensorboard = writer._trackers[0]
    writer.write(0, {"loss": 1.0})

    def unreachable(step, row):
        raise ConnectionError("the service went away")

    tensorboard.log = unreachable
    with pytest.warns(RuntimeWarning, match=r"TensorBoard failed on step 1 .*the service went away"):
        writer.write(1, {"loss": 0.5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the tracker is gone
        writer.write(2, {"loss": 0.25})
    writer.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows == [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]


def test_trackers_refused_or_renamed_with_a_clear_message(tmp_path):
    with pytest.raises(ConfigError, match="trackio, which holds one run per process"):
        _checked(sft(tmp_path, "logging.trackers=[trackio]"), {"seed": 0})
    with pytest.warns(UserWarning, match="train.tensorboard is now logging.trackers"):
        assert sft(tmp_path, "train.tensorboard=true").logging.trackers == ("jsonl", "tensorboard")
