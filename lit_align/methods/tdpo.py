"""TDPO (Zeng et al. 2024): DPO plus the sequential forward KL of each response, per token.

The objective needs more than sequence log-probs: the KL between the reference's and the
policy's next-token distributions at every response position, over the whole vocabulary. So
:class:`TDPO` overrides ``forward_pair``: one decoder forward per model, then
:func:`lit_align.model.token_kl.batch_token_kl` computes label log-probs and per-token KL of both
models chunk by chunk, without building full logits (how: :mod:`lit_align.model.token_kl`).
"""

from __future__ import annotations

import torch

from lit_align.losses import PreferenceLoss
from lit_align.losses.tdpo import TDPOVariant, tdpo_loss
from lit_align.methods.paired import PairedPreferenceModule, with_logps
from lit_align.model.reference import resolve_reference
from lit_align.model.token_kl import KL_NEEDS, batch_token_kl
from lit_align.settings import ModelSettings, NonNegative, Positive, as_settings


class TDPO(PairedPreferenceModule):
    """Token-level Direct Preference Optimization (Zeng et al. 2024); ``variant`` picks TDPO1 or TDPO2.

    Needs ``model.reference: copy`` or ``adapter`` (``auto`` picks one): the per-token KL takes
    the reference's logits over the whole vocabulary, which ``cached`` does not store. Log-probs
    and KL always take the chunked path (``model.logp_chunk_size``, 1024 when null).

    Args:
        beta: inverse temperature, as in DPO.
        alpha: TDPO2's weight of the sequential-KL difference (the authors' default 0.5).
        variant: ``tdpo2`` (stop-gradient on the chosen response's KL, the paper's main method)
            or ``tdpo1``.
    """

    runs_shared_prompts = False  # its log-probs and KL come from the hidden states of every row

    def __init__(self, beta: Positive = 0.1, alpha: NonNegative = 0.5, variant: TDPOVariant = "tdpo2", **kwargs):
        resolve_reference(as_settings(kwargs.get("model"), ModelSettings), True, "TDPO").require_forward(
            "TDPO", KL_NEEDS
        )  # before any model is built
        super().__init__(**kwargs)
        self.beta, self.alpha, self.variant = beta, alpha, variant

    def forward_pair(self, batch: dict[str, torch.Tensor]) -> PreferenceLoss:
        self.current_batch = batch
        rows = batch_token_kl(self.backbone, batch)
        chosen, rejected = rows.policy.split()
        ref_chosen, ref_rejected = rows.reference.split()
        kl_chosen, kl_rejected = rows.kl.split()
        output = tdpo_loss(
            chosen.sum,
            rejected.sum,
            ref_chosen.sum,
            ref_rejected.sum,
            kl_chosen.sum,
            kl_rejected.sum,
            self.beta,
            self.alpha,
            self.variant,
        )
        return with_logps(output, chosen, rejected)
