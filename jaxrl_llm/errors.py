"""The errors jaxrl_llm raises on input a user can fix; the command lines catch `JaxrlError` and print
its message as one `error:` line.

Every message names the field, file or value at fault and the fix. The subclasses say where the
problem lies; each is also a ValueError (or RuntimeError) so existing `except ValueError` code keeps
working.
"""


import difflib


def did_you_mean(word: str, candidates) -> str:
    """'; did you mean X?' for the candidate closest to `word`, or '.' when none is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f"; did you mean {close[0]!r}?" if close else "."


class JaxrlError(Exception):
    """A problem with the user's input or environment; the message names it and the fix."""


class ConfigError(JaxrlError, ValueError):
    """A bad configuration."""


class DataError(JaxrlError, ValueError):
    """Bad data: a missing file, a malformed line, a missing field."""


class RewardError(JaxrlError, ValueError):
    """An unknown, unimportable or failing reward function."""


class TokenizerError(JaxrlError, ValueError):
    """A tokenizer that cannot be loaded, or prompts that do not fit it."""


class ModelLoadError(JaxrlError, ValueError):
    """A model source that cannot be loaded."""


class ShardingError(JaxrlError, ValueError):
    """A mesh that does not fit the devices, the batch or the model."""


class CheckpointError(JaxrlError, RuntimeError):
    """A checkpoint that cannot be written or restored."""


class TrainingError(JaxrlError, RuntimeError):
    """A run that cannot start or continue (e.g. a non-finite loss); the last good checkpoint is kept."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (sent by SLURM, Kubernetes, TPU preemption): the run stopped like Ctrl-C, its last
    finished step saved."""


class EnvError(JaxrlError, RuntimeError):
    """An environment of a multi-turn rollout that fails outside its tools."""
