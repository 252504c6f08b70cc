"""The user and item ID tables and their projections to the LLM width (the soft tokens).

Index conventions (docs/DEVELOPING.md): users ``1..U`` and items ``1..I``; user row 0 is the
learned unknown user (what a cold user with a history but no id gets), item row 0 is padding
(fixed at zero, never trained, never scored).
"""

from __future__ import annotations

import torch
from torch import nn


class IDEmbeddings(nn.Module):
    """``E_user (U+1, d)``, ``E_item (I+1, d)`` and the projections ``d -> d_model``.

    Users and items get separate projections: they live in different spaces, and the item table
    is also the output layer (tied scoring), which a shared projection would constrain.

    Args:
        num_users: number of known users U (rows 1..U; row 0 is the unknown user).
        num_items: number of items I (rows 1..I; row 0 is padding).
        embedding_dim: table width d (``model.embedding_dim``).
        d_model: width of the backbone's hidden states.
        init_std: standard deviation of the normal initialisation of both tables.
        sparse: sparse gradients for both tables (for SparseAdam on large catalogues).
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        embedding_dim: int,
        d_model: int,
        init_std: float = 0.02,
        sparse: bool = False,
        token_scale: float = 1.0,
        projection_init: str = "default",
    ) -> None:
        super().__init__()
        if num_users < 0 or num_items < 1:
            raise ValueError(f"need num_users >= 0 and num_items >= 1, got {num_users}, {num_items}")
        self.num_users = num_users
        self.num_items = num_items
        self.embedding_dim = embedding_dim
        self.user_embeddings = nn.Embedding(num_users + 1, embedding_dim, sparse=sparse)
        self.item_embeddings = nn.Embedding(num_items + 1, embedding_dim, padding_idx=0, sparse=sparse)
        self.user_proj = nn.Linear(embedding_dim, d_model)
        self.item_proj = nn.Linear(embedding_dim, d_model)
        self.token_scale = float(token_scale)
        nn.init.normal_(self.user_embeddings.weight, std=init_std)
        nn.init.normal_(self.item_embeddings.weight, std=init_std)
        with torch.no_grad():
            self.item_embeddings.weight[0].zero_()
        if projection_init == "orthogonal":
            for projection in (self.user_proj, self.item_proj):
                init_orthogonal(projection)

    def user_tokens(self, user_ids: torch.Tensor) -> torch.Tensor:
        """Soft tokens of users: ``(...,)`` ids -> ``(..., d_model)``."""
        return self.user_proj(self.user_embeddings(user_ids)) * self.token_scale

    def item_tokens(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Soft tokens of items: ``(...,)`` ids -> ``(..., d_model)`` (padding gives the bias only)."""
        return self.item_proj(self.item_embeddings(item_ids)) * self.token_scale


def init_orthogonal(projection: nn.Linear) -> None:
    """(Semi-)orthogonal weight, zero bias: a projection that keeps norms and angles (exactly
    when it widens or keeps the width, on its row space when it narrows)."""
    nn.init.orthogonal_(projection.weight)
    if projection.bias is not None:
        nn.init.zeros_(projection.bias)
