"""The listwise data module: a prompt with K scored responses, for RRHF, PRO and LiPO."""

from __future__ import annotations

from typing import Annotated, Any, Optional

from lit_align.data.collate import ListLayout
from lit_align.data.datamodule import AlignmentDataModule
from lit_align.data.errors import DroppableRecord
from lit_align.data.listwise import normalise_listwise
from lit_align.settings import Range


class ListwiseDataModule(AlignmentDataModule):
    """Listwise examples ``{prompt, responses: [...], scores: [...]}`` (or ``ranks``, 1 = best).

    Every setting of :class:`AlignmentDataModule` applies; ``batch_size`` counts prompts, and the
    K responses of a prompt run in the same forward as adjacent rows (``K * batch_size`` rows).
    The built-in task gives the correct answer, the unchanged word and partly-correct answers,
    scored by the fraction of correct positions.

    Args:
        list_size: responses per prompt of the built-in task.
        max_responses: keep only the best-scored N responses of each record (None: all).
    """

    layout = ListLayout()
    record_fields = ("prompt", "responses", "scores", "ranks")
    example_features = {"prompt": "ids", "responses": "ids_list", "scores": "floats"}

    def __init__(
        self,
        *args,
        list_size: Annotated[int, Range(2)] = 4,
        max_responses: Optional[Annotated[int, Range(2)]] = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)

    def builtin_records(self, split: str) -> list[dict[str, Any]]:
        return self.task.ranked(split, self.hparams.list_size)

    def tokenize_record(self, record: dict[str, Any], source: str, index: int) -> list[dict[str, Any]]:
        h = self.hparams
        item = normalise_listwise(record, source, index, h.columns)
        order = sorted(range(len(item.responses)), key=lambda k: -item.scores[k])[: h.max_responses]
        texts = {f"responses[{k}]": item.responses[k] for k in order}
        prompt, responses = self.tokenize_responses(item.prompt, texts, source, index)
        ids = list(responses.values())
        if len({tuple(values) for values in ids}) < len(ids):
            raise DroppableRecord(
                source, "two responses are identical after tokenization and truncation", index, "responses"
            )
        return [{"prompt": prompt, "responses": ids, "scores": [item.scores[k] for k in order]}]
