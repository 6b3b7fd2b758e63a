"""jaxrl_llm: pure-functional JAX post-training for LLMs (SFT, RM, PPO, GRPO family, DPO).

Public entry points are imported lazily so `import jaxrl_llm` stays light (and never
imports torch).
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_model": "jaxrl_llm.models.load",
    "export_hf": "jaxrl_llm.models.load",
    "LoadedModel": "jaxrl_llm.models.load",
    "load_scalar_model": "jaxrl_llm.models.load",
    "ModelConfig": "jaxrl_llm.models.transformer",
    "generate": "jaxrl_llm.sampling",
    "SamplingConfig": "jaxrl_llm.sampling",
    "load_config": "jaxrl_llm.config",
    "train": "jaxrl_llm.run",
    "core": "jaxrl_llm.core",
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'jaxrl_llm' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    return module if name == "core" else getattr(module, name)


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
