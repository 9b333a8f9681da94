"""The ``lit-align`` commands besides LightningCLI's ``fit``/``validate``/``test``, one module each:
``lit-align generate`` (completions of prompts), ``lit-align eval`` (held-out metrics of a
checkpoint or export on a data file) and ``lit-align plot`` (the curves of runs).

* :mod:`lit_align.commands.models`: a policy and tokenizer from any model source, and a method
  module from a checkpoint or an export folder with its ``config.yaml``.
* :mod:`lit_align.commands.prompts`: prompts from the command line or a file, tokenized as training
  tokenizes them, and greedy or sampled completions in batches.
* :mod:`lit_align.commands.generate`, :mod:`lit_align.commands.evaluate`, :mod:`lit_align.commands.plot`:
  the commands.
"""

from lit_align.errors import LitAlignError

COMMANDS = ("fit", "validate", "test", "export", "convert-pairs", "generate", "eval", "plot")
"""Every ``lit-align`` command: LightningCLI's three, then lit-align's own."""


class CommandError(LitAlignError, ValueError):
    """A command's arguments cannot work together (e.g. both ``--prompt`` and ``--prompts``); the
    message says which and the hint what to give instead."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint
