"""Prefix sharing (``model.prefix_sharing``): each prompt run once, the same log-probs, gradients
and training as whole rows; refused where it cannot work, with the setting named."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import quiet_trainer

from lit_align.data import PreferenceDataModule, WordRulesTask
from lit_align.data.collate import PairCollator, PairLayout
from lit_align.data.contract import ServedData
from lit_align.errors import SettingError
from lit_align.methods import DPO, GRPO, SFT, TDPO
from lit_align.methods.paired import check_prefix_sharing
from lit_align.model.backbone import Backbone
from lit_align.model.prefix_sharing import shared_prompt_hidden_states, split_shared_prompts
from lit_align.runtime.strategies import FSDP2Strategy, FSDPStrategy
from lit_align.settings import LoRA, ModelSettings, OptimizerSettings


def random_pairs(lengths, vocab=200, seed=1):
    """Pairs of random token ids with the given (prompt, chosen, rejected) lengths."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for prompt, chosen, rejected in lengths:
        ids = torch.randint(3, vocab, (prompt + chosen + rejected,), generator=generator).tolist()
        pairs.append(
            {"prompt": ids[:prompt], "chosen": ids[prompt : prompt + chosen], "rejected": ids[prompt + chosen :]}
        )
    return pairs


LENGTHS = [(5, 7, 3), (9, 2, 6), (1, 4, 4)]  # a one-token prompt; rows and responses of different lengths


def test_split_puts_each_prompt_once_and_the_responses_after_it():
    pairs = [
        {"prompt": [11, 12], "chosen": [21, 22, 23], "rejected": [31]},
        {"prompt": [13], "chosen": [24], "rejected": [32, 33]},
    ]
    split = split_shared_prompts(PairCollator(pad_token_id=0)(pairs))
    # rows: [11 12 21 22 23], [13 24], [11 12 31], [13 32 33] (chosen rows first, right-padded)
    assert split.prompt_ids.tolist() == [[11, 12], [13, 0]]
    assert split.prompt_mask.tolist() == [[1, 1], [1, 0]]
    assert split.prompt_lengths.tolist() == [2, 1]
    assert split.response_ids.tolist() == [[21, 22, 23], [24, 0, 0], [31, 0, 0], [32, 33, 0]]
    assert split.response_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 1, 0]]
    assert split.response_labels.tolist() == [[21, 22, 23], [24, -100, -100], [31, -100, -100], [32, 33, -100]]
    # positions continue each row's own prompt
    assert split.response_positions[:, :2].tolist() == [[2, 3], [1, 2], [2, 3], [1, 2]]


def test_split_refuses_rows_that_do_not_share_their_prompt():
    batch = PairCollator(pad_token_id=0)(random_pairs([(4, 3, 3), (5, 2, 2)]))
    batch["input_ids"][3, 1] += 1  # pair 2's rejected row gets another prompt token
    with pytest.raises(ValueError, match=r"rows 2\.\. do not repeat the prompts of rows 0\.\.1"):
        split_shared_prompts(batch)
    batch = PairCollator(pad_token_id=0)(random_pairs([(4, 3, 3)]))
    batch["labels"][:, 0] = batch["input_ids"][:, 0]  # a label on the first token: no prompt before it
    with pytest.raises(ValueError, match="no prompt tokens before its first label"):
        split_shared_prompts(batch)


def shared_and_rows(backbone: Backbone, model=None):
    """(shared, whole-row) log-probs of LENGTHS' pairs and the gradients of their sums."""
    batch = PairCollator(backbone.tokenizer.pad_token_id)(random_pairs(LENGTHS))
    model = model if model is not None else backbone.policy
    trained = [p for p in backbone.parameters() if p.requires_grad]
    out = []
    for logps in (backbone.shared_prompt_logps(batch, model), backbone.row_logps(batch, model)):
        out.append((logps, torch.autograd.grad(logps.sum.sum(), trained)))
    return out


@pytest.mark.parametrize("chunk", [1024, None], ids=["chunked", "no-chunk-setting"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_logps_and_gradients_equal_whole_rows(chunk, attention):
    backbone = Backbone(ModelSettings(logp_chunk_size=chunk, attn_implementation=attention), needs_reference=False)
    (shared, shared_grads), (rows, row_grads) = shared_and_rows(backbone)
    assert torch.equal(shared.mask, rows.mask) and int(rows.mask.sum()) == sum(c + r for _, c, r in LENGTHS)
    torch.testing.assert_close(shared.tokens, rows.tokens, atol=1e-5, rtol=1e-5)
    assert float(rows.tokens.abs().max()) > 1  # real log-probs, not zeros
    for a, b in zip(shared_grads, row_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert max(float(g.abs().max()) for g in row_grads) > 1e-2
    assert backbone.prefix_sharing_matches() == (True, pytest.approx(0.0, abs=1e-5))


def test_shared_prompts_under_lora_with_the_adapter_reference():
    backbone = Backbone(ModelSettings(lora=LoRA(r=4, alpha=8), prefix_sharing=True), needs_reference=True)
    with torch.no_grad():  # adapters that do something, so policy and reference differ
        for name, p in backbone.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    (shared, shared_grads), (rows, row_grads) = shared_and_rows(backbone)
    torch.testing.assert_close(shared.tokens, rows.tokens, atol=1e-5, rtol=1e-5)
    for a, b in zip(shared_grads, row_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    batch = PairCollator(backbone.tokenizer.pad_token_id)(random_pairs(LENGTHS))
    reference = backbone.reference_logps(batch)  # through logps: shared, adapters off
    with backbone.policy.disable_adapter():
        torch.testing.assert_close(
            reference.tokens, backbone.row_logps(batch, backbone.policy).tokens, atol=1e-5, rtol=1e-5
        )
    assert float((reference.sum - rows.sum.detach()).abs().max()) > 1e-3


def fit_losses(prefix_sharing: bool, reference: str = "copy") -> list[float]:
    L.seed_everything(0)
    module = DPO(
        model=ModelSettings(reference=reference, prefix_sharing=prefix_sharing),
        optimizer=OptimizerSettings(lr=1e-3, warmup_ratio=0.0),
    )
    data = PreferenceDataModule(batch_size=8, max_length=48, task=WordRulesTask(num_train=32, num_val=8))
    losses = []
    logger = type(
        "Losses", (L.Callback,), {"on_train_batch_end": lambda s, t, m, out, b, i: losses.append(float(out["loss"]))}
    )
    trainer = quiet_trainer(max_steps=4, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[logger()])
    trainer.fit(module, data)
    return losses


@pytest.mark.parametrize("reference", ["copy", "cached"])
def test_training_with_prefix_sharing_gives_the_whole_row_losses(reference):
    rows, shared = fit_losses(False, reference), fit_losses(True, reference)
    assert len(rows) == 4 and rows[0] == pytest.approx(0.6931, abs=1e-3)  # every margin 0 at step 0: log 2
    assert shared == pytest.approx(rows, abs=1e-5)
    assert abs(rows[-1] - rows[0]) > 1e-3  # the steps moved the policy


def test_a_model_whose_shared_prompts_differ_is_refused_before_training(monkeypatch):
    monkeypatch.setattr(Backbone, "prefix_sharing_matches", lambda self, device=None: (False, 0.25))
    with pytest.raises(SettingError, match=r"model.prefix_sharing.*differ from the unshared forward's by 2.50e-01"):
        fit_losses(True)


def test_a_sliding_window_cache_is_refused():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8,
    )  # fmt: skip
    batch = PairCollator(pad_token_id=0)(random_pairs([(6, 3, 2)], vocab=100))
    with pytest.raises(ValueError, match="DynamicSlidingWindowLayer cache layers"):
        shared_prompt_hidden_states(MistralForCausalLM(config), split_shared_prompts(batch))


def test_a_cache_that_cannot_be_shared_is_refused_before_training(monkeypatch):
    def sliding(model, shared):
        raise ValueError("prefix sharing: DynamicSlidingWindowLayer cache layers (sliding window or recurrent state)")

    monkeypatch.setattr("lit_align.model.backbone.shared_prompt_hidden_states", sliding)
    with pytest.raises(SettingError, match=r"DynamicSlidingWindowLayer .*: remove model.prefix_sharing"):
        fit_losses(True)


@pytest.mark.parametrize("method", [SFT, GRPO, TDPO], ids=lambda m: m.__name__)
def test_methods_that_do_not_score_shared_prompts_refuse_the_setting(method):
    with pytest.raises(SettingError, match=f"{method.__name__} does not score responses that share a prompt"):
        method(model=ModelSettings(prefix_sharing=True))


def test_prefix_sharing_refuses_gradient_checkpointing_fsdp_and_packing():
    with pytest.raises(SettingError, match="gradient_checkpointing drops"):
        ModelSettings(prefix_sharing=True, gradient_checkpointing=True)
    for strategy in (FSDPStrategy.__new__(FSDPStrategy), FSDP2Strategy.__new__(FSDP2Strategy)):
        with pytest.raises(SettingError, match=f"not supported under {type(strategy).__name__}"):
            check_prefix_sharing(strategy, None)
    with pytest.raises(SettingError, match=r"remove one \(data.init_args.packing or model.prefix_sharing\)"):
        check_prefix_sharing(L.Trainer(logger=False).strategy, ServedData(PairLayout(), packing=True))
