"""GRM training objectives. Shapes: B batch, K regions, L tokens, d features.

    L = a·L(S_ori) + b·L(S_key) + c·L(S_unc) + λ_recon·L_recon + λ_KL·L_KL + λ_ent·L_ent (+ λ_keep·L_keep)

Travels to the Hub with a checkpoint: imports only torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "hinge_triplet_loss",
    "infonce_loss",
    "keep_ratio_loss",
    "kl_to_standard_normal",
    "positive_pair_mask",
    "prompt_usage_negative_entropy",
    "semantic_consistency_loss",
]


def positive_pair_mask(
    image_ids: torch.Tensor | None,
    batch_size: int,
    device: torch.device,
    caption_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """`[B, B]` bool, True where pair i's image and pair j's caption belong together: the same image
    (`image_ids` `[B]`) or an identical caption string (`caption_ids` `[B]`); always on the diagonal.

    With caption ids, "a red apple" on two images makes each image a positive of the other's caption
    instead of a negative pushed away.
    """
    positives = torch.eye(batch_size, dtype=torch.bool, device=device)
    for ids in (image_ids, caption_ids):
        if ids is not None:
            positives = positives | (ids[:, None] == ids[None, :])
    return positives


def hinge_triplet_loss(
    scores: torch.Tensor, positives: torch.Tensor, margin: float, hardest_negative: bool
) -> torch.Tensor:
    """VSE++ bidirectional hinge loss on a `[B, B]` score matrix whose diagonal holds the true pairs.

    For image i: `Σ_j [m + S(i, j) − S(i, i)]₊` over captions j of other images (or the hardest one), and
    symmetrically for caption j over images. Negatives sharing the positive's image are masked. Summed
    over the batch, as in VSE++.
    """
    diagonal = scores.diagonal()
    cost_caption = (margin + scores - diagonal[:, None]).clamp_min(0).masked_fill(positives, 0)
    cost_image = (margin + scores - diagonal[None, :]).clamp_min(0).masked_fill(positives, 0)
    if hardest_negative:
        return cost_caption.amax(dim=1).sum() + cost_image.amax(dim=0).sum()
    return cost_caption.sum() + cost_image.sum()


def infonce_loss(
    scores: torch.Tensor, positives: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """Symmetric InfoNCE on `[B, B]` scores × `logit_scale` (= 1/τ, a tensor when learnt); other positives of
    a row (captions of the same image, identical captions) are left out of its negatives."""
    off_diagonal_positives = positives & ~torch.eye(len(scores), dtype=torch.bool, device=scores.device)
    logits = (scores * logit_scale).masked_fill(off_diagonal_positives, float("-inf"))
    targets = torch.arange(len(scores), device=scores.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


def semantic_consistency_loss(
    region_means: torch.Tensor, masked_tokens: torch.Tensor, spatial_mask: torch.Tensor
) -> torch.Tensor:
    """L_recon = `‖norm(mean_k μ_k) − norm(mean_l V̂_l)‖²`, averaged over the batch.

    region_means `[B, K, d]`, masked tokens V̂ `[B, L, d]`, spatial_mask `[B, L]` (the tokens regions use).
    """
    weights = spatial_mask.to(masked_tokens.dtype).unsqueeze(-1)
    patch_mean = (masked_tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    difference = F.normalize(region_means.mean(1), dim=-1) - F.normalize(patch_mean, dim=-1)
    return difference.pow(2).sum(-1).mean()


def kl_to_standard_normal(means: torch.Tensor, logvars: torch.Tensor, variance_only: bool) -> torch.Tensor:
    """L_KL = `KL(N(μ, σ²) ‖ N(0, I))` per dimension, averaged over B, K and d.

    `½(μ² + σ² − 1 − log σ²)`; `variance_only` drops the μ² term, which otherwise pulls regions to 0.
    """
    kl = logvars.exp() - 1.0 - logvars
    if not variance_only:
        kl = kl + means.pow(2)
    return 0.5 * kl.mean()


def prompt_usage_negative_entropy(mixture_weights: torch.Tensor) -> torch.Tensor:
    """L_ent = `Σ_k p̄_k log p̄_k` of the batch-average prompt usage p̄ `[K]` (mixture weights `[B, K]`).

    Minimising it spreads the patches over all prompts instead of letting one prompt take everything.
    """
    usage = mixture_weights.mean(0).clamp_min(1e-12)
    return (usage * usage.log()).sum()


def keep_ratio_loss(keep_weights: torch.Tensor, token_mask: torch.Tensor, target: float) -> torch.Tensor:
    """Optional LAPS-style penalty `(mean(A) − ρ)²` over real tokens; keep_weights, token_mask `[B, L]`."""
    mask = token_mask.to(keep_weights.dtype)
    ratio = (keep_weights * mask).sum() / mask.sum().clamp_min(1.0)
    return (ratio - target).pow(2)
