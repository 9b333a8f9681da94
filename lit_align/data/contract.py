"""The one contract between a method and its data module.

A method declares what it needs of its data once, as a :class:`DataRequest`
(:meth:`lit_align.methods.alignment.AlignmentModule.data_request`); the data module receives it
in one place, :meth:`lit_align.data.datamodule.AlignmentDataModule.serve`, and answers in one
place, a :class:`ServedData`. Neither side reads the other's attributes: what the method needs
(the layout, mismatched completions, class counts, ptx batches, a check of every example) and
what the data module decides (its layout, whether packing stays on, the class counts) cross here
and nowhere else; the cached reference hands its values to the data module, which attaches them
to its own examples. Callbacks use the same two objects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from lit_align.data.collate import Layout

log = logging.getLogger(__name__)

ExampleCheck = Callable[[str, str, list[dict[str, Any]]], None]
"""``check(split, source, examples)``: raise :class:`lit_align.data.DataError` naming the first
example an objective cannot train on (see ``AlignmentModule.check_examples``)."""


@dataclass(frozen=True)
class DataRequest:
    """What a method needs of its data.

    Args:
        method: the method's name, for errors.
        layouts: the data layouts the method trains on (usually one).
        data_modules: the data module(s) that give such data, named in the error when another is configured.
        tokenizer: the method's tokenizer; the data module tokenizes with it.
        mismatched_completions: unpaired data must carry, per example, a completion of another
            prompt (KTO's KL reference point).
        class_counts: the data module must count desirable and undesirable training examples
            (class-balancing weights of KTO and BCO).
        ptx: training batches must carry ``ptx`` demonstrations (PPO-ptx).
        ptx_setting: the method's setting that turns ``ptx`` on (PPO's ``ptx_coef``), None if it
            has none: ptx batches it would never train on are refused, naming it.
        check_examples: run on every split before the first batch.
    """

    method: str
    layouts: tuple[type[Layout], ...]
    data_modules: str
    tokenizer: PreTrainedTokenizerBase
    mismatched_completions: bool = False
    class_counts: bool = False
    ptx: bool = False
    ptx_setting: str | None = None
    check_examples: ExampleCheck | None = None


@dataclass
class ServedData:
    """The data module's answer to a :class:`DataRequest`.

    Args:
        layout: the layout its batches have.
        packing: whether batches are packed; requested by the ``packing`` setting, kept only if
            :meth:`settle_packing` finds the model isolates packed sequences.
        class_counts: desirable and undesirable training examples, when requested.
    """

    layout: Layout
    packing: bool = False
    class_counts: dict[str, int] | None = None
    _packing_settled: bool = field(default=False, repr=False)

    def settle_packing(self, isolates: Callable[[], tuple[bool, float]], attention: str | None) -> bool:
        """Keep packing only if ``isolates()`` (packed vs padded log-probs of the model agree)
        says so; decided once, the reason logged when packing is turned off."""
        if self.packing and not self._packing_settled:
            isolated, difference = isolates()
            if not isolated:
                self.packing = False
                log.warning(
                    "packing disabled, using padding: attention %r lets packed sequences see each other "
                    "(packed vs padded log-probs differ by %.2e)",
                    attention,
                    difference,
                )
        self._packing_settled = True
        return self.packing
