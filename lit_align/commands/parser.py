"""The argument parser of ``lit-align fit/validate/test``: LightningCLI's, with shorter errors.

jsonargparse answers a bad option or value by printing the usage of every option the subcommand
accepts (about 100 lines of Trainer flags) before what is wrong, and a misspelt method
(``--model DPOO``) with a dump of the types the setting accepts and "Expected a dot import path
string". Here the error comes alone, as ``lit-align fit: error: ...``, then a hint line: an unknown
``--model``/``--data`` class is one line with the closest lit-align names, a class whose module
cannot be imported says what it lacks, anything else is jsonargparse's message with where the
options are listed. With ``LIT_ALIGN_DEBUG`` or ``JSONARGPARSE_DEBUG`` (which raises instead)
jsonargparse's own error output is kept.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys

from lightning.pytorch.cli import LightningArgumentParser

from lit_align.commands import COMMANDS
from lit_align.errors import debugging

SECTIONS = {
    "model": ("lit_align.methods", "lit_align.methods.alignment:AlignmentModule", "method"),
    "data": ("lit_align.data", "lit_align.data.datamodule:AlignmentDataModule", "data module"),
}
"""For ``--model`` and ``--data``: the module whose classes a config names, their base class, and
what one is called."""


class LitAlignParser(LightningArgumentParser):
    """LightningCLI's parser; :meth:`error` prints the error and a hint, without the usage."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG") or debugging():
            return super().error(message, ex)
        prog = " ".join(["lit-align", *self.prog.replace(" [options]", "").split()[1:]])  # not python's argv[0]
        text, hint = (
            class_error(message)
            or command_error(message, prog)
            or (
                message.strip(),
                f"{prog} --help lists the options; --model.help CLASS and --data.help CLASS a class's settings",
            )
        )
        sys.stderr.write(f"{prog}: error: {text}\nhint: {hint}\n")
        self.exit(2)


def class_error(message: str) -> tuple[str, str] | None:
    """(one-line message, hint) when ``message`` is jsonargparse's answer to a ``--model`` or
    ``--data`` class that does not exist or cannot be imported; None for any other message."""
    section = re.match(r'\s*Parser key "(\w+)"', message)
    given = re.search(r"Problem with given class_path '([\w.]+)'", message) or re.search(
        r"Given value: ([\w.]+)\s*$", message
    )
    if not section or section.group(1) not in SECTIONS or not given:
        return None
    key, value = section.group(1), given.group(1)
    module_name, _, kind = SECTIONS[key]
    missing_module = re.search(r"Problem with given class_path '[^']+':\s+(No module named '[^']+')", message)
    if missing_module:
        return (
            f"{key} {value} cannot be imported: {missing_module.group(1)}",
            "install what it imports, or check the file's name (a class of your own is found in the folder lit-align "
            "runs from)",
        )
    if "Expected a dot import path string" not in message and "has no attribute" not in message:
        return None
    known = class_names(key)
    by_lower = {name.lower(): name for name in known}
    close = difflib.get_close_matches(value.rsplit(".", 1)[-1].lower(), by_lower, n=3, cutoff=0.6)
    suggestion = f"did you mean {' or '.join(by_lower[name] for name in close)}? " if close else ""
    return (
        f"{key} {value}: no {kind} of {module_name} or class of your own is called that",
        f"{suggestion}{module_name} has {', '.join(known)}; a class of your own: --{key} my_file.MyClass",
    )


def command_error(message: str, prog: str) -> tuple[str, str] | None:
    """(message, hint) for a missing or unknown command (``lit-align fitt``): LightningCLI's parser
    knows only fit, validate and test, so the hint names every command and the closest one."""
    if prog != "lit-align" or "subcommand" not in message:
        return None
    given = re.search(r"invalid choice: '([^']*)'", message)
    close = difflib.get_close_matches(given.group(1), COMMANDS, n=1) if given else []
    text = f"no such command: {given.group(1)}" if given else "no command given"
    suggestion = f"did you mean {close[0]}? " if close else ""
    return text, f"{suggestion}the commands are {', '.join(COMMANDS)} (lit-align COMMAND --help)"


def class_names(key: str) -> list[str]:
    """The classes of ``SECTIONS[key]``'s module that subclass its base and can be run: the base and,
    for methods, the regime bases (``PairedPreferenceModule``, ``OnPolicyModule``: the ``...Module``
    classes an objective subclasses) left out."""
    module_name, base_path, _ = SECTIONS[key]
    base_module, _, base_name = base_path.partition(":")
    base = getattr(importlib.import_module(base_module), base_name)
    module = importlib.import_module(module_name)
    values = ((name, getattr(module, name)) for name in getattr(module, "__all__", []))
    runnable = ((name, value) for name, value in values if not (key == "model" and name.endswith("Module")))
    return [
        name for name, value in runnable if inspect.isclass(value) and issubclass(value, base) and value is not base
    ]
