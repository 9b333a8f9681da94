"""The policy as the judge of its own completions (Self-Rewarding Language Models)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning import LightningModule

from lit_align.data.labels import IGNORE_INDEX
from lit_align.online.rewards import RewardFunction
from lit_align.settings import Count, check_arguments


class SelfJudge(RewardFunction):
    """The policy judges its own completions (LLM-as-a-judge of Yuan et al. 2024, Self-Rewarding
    Language Models, sec. 2.2, reduced to a yes/no question): score = p(yes) / (p(yes) + p(no))
    = sigmoid(log p(yes | q) - log p(no | q)) for the judge question q = ``template`` filled with
    the prompt and the completion, under the current policy (LoRA adapters on), no gradients.
    ``yes``/``no`` are scored by their full log-probability, which is the next-token
    distribution when each is one token (as " yes"/" no" are for most BPE tokenizers).

    :class:`lit_align.methods.on_policy.OnPolicyModule` calls :meth:`attach` at fit, validation and test start. Meant
    for real instruction-tuned models (with ``chat_template: true``); with a tiny random model the
    judgement is noise and meaningless. The judge is the live policy, so it changes as it trains.

    Args:
        template: the judge question, with ``{prompt}`` and ``{completion}`` fields.
        yes: the affirmative answer's text.
        no: the negative answer's text.
        chat_template: wrap the question in the tokenizer's chat template as one user turn.
        max_length: longest judge question in tokens (longer ones keep their end).
        batch_size: judge questions per forward (two rows each).
    """

    def __init__(
        self,
        template: str = "Question: {prompt}\nAnswer: {completion}\nIs this answer correct? Answer yes or no:",
        yes: str = " yes",
        no: str = " no",
        chat_template: bool = False,
        max_length: Count = 512,
        batch_size: Count = 16,
    ):
        check_arguments(self, locals())
        self.template, self.yes, self.no = template, yes, no
        self.chat_template, self.max_length, self.batch_size = chat_template, max_length, batch_size
        self.module: LightningModule | None = None

    def attach(self, module: LightningModule) -> None:
        """Use ``module``'s policy and tokenizer as the judge."""
        self.module = module

    def question_ids(self, prompt: str | Sequence[dict[str, str]], completion: str) -> list[int]:
        tokenizer = self.module.tokenizer
        if not isinstance(prompt, str):
            prompt = "\n".join(f"{message['role']}: {message['content']}" for message in prompt)
        question = self.template.format(prompt=prompt, completion=completion)
        if self.chat_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = tokenizer(question, add_special_tokens=True)["input_ids"]
        return ids[:-1] if tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id] else ids

    @torch.no_grad()
    def score(self, prompts: Sequence, completions: Sequence[str]) -> torch.Tensor:
        if self.module is None:
            raise RuntimeError(
                "SelfJudge is not attached to a module: on-policy methods attach their reward at fit start; call "
                "attach(module) first"
            )
        tokenizer, backbone = self.module.tokenizer, self.module.backbone
        answers = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (self.yes, self.no)]
        rows = []
        for prompt, completion in zip(prompts, completions, strict=True):
            question = self.question_ids(prompt, completion)
            rows += [(question[max(0, len(question) + len(answer) - self.max_length) :], answer) for answer in answers]
        was_training = backbone.policy.training
        backbone.policy.eval()
        try:
            logps = (
                torch.cat(
                    [
                        backbone.logps(self.collate(rows[start : start + 2 * self.batch_size])).sum
                        for start in range(0, len(rows), 2 * self.batch_size)
                    ]
                )
                if rows
                else torch.zeros(0)
            )
        finally:
            backbone.policy.train(was_training)
        return torch.sigmoid(logps[0::2] - logps[1::2]).float()

    def collate(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """Right-padded question + answer rows, labels on the answer tokens only."""
        pad = self.module.tokenizer.pad_token_id if self.module.tokenizer.pad_token_id is not None else 0
        width = max(len(q) + len(a) for q, a in rows)
        ids, mask, labels = [], [], []
        for question, answer in rows:
            fill = width - len(question) - len(answer)
            ids.append(question + answer + [pad] * fill)
            mask.append([1] * (len(question) + len(answer)) + [0] * fill)
            labels.append([IGNORE_INDEX] * len(question) + answer + [IGNORE_INDEX] * fill)
        device = self.module.device
        return {
            "input_ids": torch.tensor(ids, device=device),
            "attention_mask": torch.tensor(mask, device=device),
            "labels": torch.tensor(labels, device=device),
        }
