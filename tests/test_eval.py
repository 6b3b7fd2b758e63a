"""`python -m jaxrl_llm.eval` and `python -m jaxrl_llm.plot` on tiny runs; the `smollm2` source name."""

import json
import os

import pytest

from jaxrl_llm import eval as eval_cli
from jaxrl_llm import plot as plot_cli
from jaxrl_llm.config import load_config
from jaxrl_llm.models.load import packaged_model, read_checkpoint
from jaxrl_llm.run import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=1",
    "model.tiny.head_dim=8", "data.synthetic.num_examples=400", "data.eval_size=8", "data.batch_size=8",
    "data.max_completion_len=8", "train.eval_every=2",
]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("runs") / "sft")
    config = load_config(os.path.join(ROOT, "configs", "sft.yaml"), [
        *TINY, f"run_dir={run_dir}", "data.task=arithmetic", "data.max_prompt_len=32", "train.total_steps=2",
        "optim.lr=3e-3",
    ])
    return train(config, quiet=True)


def report(capsys, *argv) -> dict:
    assert eval_cli.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_of_a_run_folder_equals_its_hf_export_and_reports_samples(sft_run, capsys):
    from_checkpoint = report(capsys, sft_run.run_dir, "--samples", "2")
    own_config = os.path.join(sft_run.run_dir, "config.yaml")
    from_hf = report(capsys, os.path.join(sft_run.run_dir, "hf"), "--config", own_config)
    assert from_checkpoint["examples"] == 8 and len(from_checkpoint["samples"]) == 2
    assert set(from_checkpoint["samples"][0]) == {"prompt", "answer", "expected"}
    for name in ("eval/accuracy", "eval/reward", "eval/response_length"):
        assert from_checkpoint[name] == pytest.approx(from_hf[name]), name
    assert 1 <= from_checkpoint["eval/response_length"] <= 8
    sampled = report(capsys, sft_run.run_dir, "--temperature", "1.0", "--n", "2", "--samples", "2")
    assert sampled["decoding"] == "sampled, T=1.0, 2 per prompt" and len(sampled["samples"]) == 2
    assert [s["prompt"] for s in sampled["samples"]] == [s["prompt"] for s in from_checkpoint["samples"]]


def test_eval_text_report_and_errors(sft_run, capsys, tmp_path):
    assert eval_cli.main([sft_run.run_dir, "data.eval_size=4", "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "on 4 held-out arithmetic prompts" in out and "accuracy" in out and "->" in out
    assert eval_cli.main([str(tmp_path / "missing")]) == 2
    assert "no such local folder or file" in capsys.readouterr().err
    assert eval_cli.main([sft_run.run_dir, "data.eval_size=0"]) == 2
    assert "data.eval_size is 0" in capsys.readouterr().err
    for argv, message in (
        (["mesh.data=2"], "mesh data=2 × fsdp=1 × tensor=1 = 2 devices, but 1 are available"),
        (["--temperature", "1.0", "--n", "0"], "--temperature must be >= 0 and --n >= 1, got 1.0 and 0"),
        (["--temperature", "-1"], "--temperature must be >= 0 and --n >= 1, got -1.0 and 1"),
    ):
        assert eval_cli.main([sft_run.run_dir, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_plot_of_several_runs_with_chosen_metrics(sft_run, tmp_path):
    out = str(tmp_path / "cmp.png")
    assert plot_cli.main([sft_run.run_dir, sft_run.run_dir, "-o", out, "--metrics", "loss,eval/loss"]) == 0
    assert os.path.getsize(out) > 1000
    assert plot_cli.main([sft_run.run_dir, "--metrics", "nothing/logged", "-o", out]) == 2


def test_smollm2_names_the_packaged_gguf(smollm2_gguf):
    assert packaged_model("smollm2") == smollm2_gguf
    assert read_checkpoint("smollm2").path == smollm2_gguf
