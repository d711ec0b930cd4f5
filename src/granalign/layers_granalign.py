"""The GRM building blocks: token adapters, region prompting and the region-level Gaussian mixture.

Shapes: B batch, L tokens, K region prompts, d the shared embedding size. Travels to the Hub with a
checkpoint, so it imports only torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RegionPrompting", "RegionUncertainty", "TokenAdapter"]


class TokenAdapter(nn.Module):
    """Intra-modal soft token mask (the significance-aware and granularity-aware adapters).

    Per token, `LayerNorm → Linear(d, h) → GELU → Linear(h, 2)` gives keep/drop logits. Training draws a
    Gumbel-Softmax sample with temperature τ; eval uses `softmax(logits / τ)` without noise. The keep
    probability of padding tokens is 0.
    """

    def __init__(self, embed_dim: int, hidden_dim: int, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature
        self.scorer = nn.Sequential(
            nn.LayerNorm(embed_dim),
            nn.Linear(embed_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, 2),
        )

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """tokens `[B, L, d]`, token_mask `[B, L]` (1 = real) → keep probabilities `[B, L]` in [0, 1]."""
        logits = self.scorer(tokens).float()
        if self.training:
            keep = F.gumbel_softmax(logits, tau=self.temperature, hard=False, dim=-1)[..., 0]
        else:
            keep = torch.softmax(logits / self.temperature, dim=-1)[..., 0]
        return keep * token_mask.to(keep.dtype)


class RegionPrompting(nn.Module):
    """K learnable region prompts that softly group patches into regions.

    `A[l, k] = sigmoid(s · cos(V̂_l, P_k) + b)` (a patch may belong to several regions), each column
    normalised over the patches, `Â[l, k] = A[l, k] / Σ_l' A[l', k]`, and region means `μ_k = Σ_l Â[l, k] V̂_l`.
    """

    def __init__(self, embed_dim: int, num_regions: int, scale_init: float, bias_init: float) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.randn(num_regions, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(scale_init)))
        self.logit_bias = nn.Parameter(torch.tensor(float(bias_init)))

    def forward(
        self, tokens: torch.Tensor, spatial_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Group the spatial tokens into K regions.

        Args:
            tokens: masked tokens V̂ `[B, L, d]`.
            spatial_mask: `[B, L]`, 1 for spatial tokens, 0 for prefix ([CLS]) and padding tokens.

        Returns:
            attention `A` `[B, L, K]` (sigmoid scores, 0 outside the spatial mask), normalised attention `Â`
            `[B, L, K]` (columns sum to 1), region means `μ` `[B, K, d]`.
        """
        cosine = F.normalize(tokens, dim=-1) @ F.normalize(self.prompts, dim=-1).t()
        attention = torch.sigmoid(self.logit_scale * cosine + self.logit_bias)
        attention = attention * spatial_mask.unsqueeze(-1).to(attention.dtype)
        normalized = attention / attention.sum(dim=1, keepdim=True).clamp_min(1e-6)
        means = normalized.transpose(1, 2) @ tokens
        return attention, normalized, means


class RegionUncertainty(nn.Module):
    """Region-level Gaussians `N(μ_k, σ_k²)` with `log σ_k² = φ(μ_k)`, and their reparameterised samples.

    The paper draws `z_lk = μ_k + ε_lk ⊙ σ_k` per patch and pools `u_k = Σ_l Â[l, k] z_lk`; that sum equals
    in distribution `u_k = μ_k + σ_k ⊙ sqrt(Σ_l Â[l, k]²) ⊙ ε_k`, which needs one draw per region.
    Eval returns `u_k = μ_k`.
    """

    def __init__(self, embed_dim: int, logvar_min: float, logvar_max: float) -> None:
        super().__init__()
        self.logvar_min = logvar_min
        self.logvar_max = logvar_max
        self.log_variance = nn.Sequential(
            nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim)
        )

    def forward(
        self, means: torch.Tensor, normalized_attention: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """means `[B, K, d]`, normalised attention `[B, L, K]` → (log-variances `[B, K, d]`, samples `[B, K, d]`)."""
        logvars = self.log_variance(means).clamp(self.logvar_min, self.logvar_max)
        if not self.training:
            return logvars, means
        spread = normalized_attention.pow(2).sum(dim=1).sqrt().unsqueeze(-1)  # [B, K, 1]
        noise = torch.randn_like(means)
        return logvars, means + torch.exp(0.5 * logvars) * spread * noise
