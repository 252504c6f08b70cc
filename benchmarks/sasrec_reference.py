"""A reference SASRec (Kang and McAuley, 2018), written for the benchmarks.

It follows SASRec.pytorch (pmixer) closely: learned item and position embeddings scaled by
sqrt(d), 2 blocks of [LayerNorm -> single-head causal self-attention -> residual, LayerNorm
-> point-wise FFN (d -> d -> d, ReLU, dropout) -> residual], a final LayerNorm, and binary
cross-entropy of one positive and one sampled negative per position; Adam(lr 1e-3,
betas 0.9/0.98); batch 128; width 50; max length 50 (Amazon). It implements the package's
scorer interface (``full_sort_predict``, ``predict_candidates``), so it is evaluated by the
same evaluator on the same candidates as our models.

Not part of the package: a baseline to measure against in the same run.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class PointWiseFeedForward(nn.Module):
    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(hidden, hidden, kernel_size=1)
        self.dropout1 = nn.Dropout(dropout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv1d(hidden, hidden, kernel_size=1)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.dropout2(self.conv2(self.relu(self.dropout1(self.conv1(inputs.transpose(-1, -2))))))
        return x.transpose(-1, -2) + inputs


class SASRec(nn.Module):
    """SASRec with pmixer's defaults. Items are 1..num_items, 0 is padding (left padding)."""

    def __init__(self, num_items: int, hidden: int = 50, num_blocks: int = 2, num_heads: int = 1,
                 dropout: float = 0.5, max_len: int = 50) -> None:
        super().__init__()
        self.num_items = num_items
        self.max_len = max_len
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len + 1, hidden, padding_idx=0)
        self.emb_dropout = nn.Dropout(dropout)
        self.attention_layernorms = nn.ModuleList()
        self.attention_layers = nn.ModuleList()
        self.forward_layernorms = nn.ModuleList()
        self.forward_layers = nn.ModuleList()
        for _ in range(num_blocks):
            self.attention_layernorms.append(nn.LayerNorm(hidden, eps=1e-8))
            self.attention_layers.append(nn.MultiheadAttention(hidden, num_heads, dropout, batch_first=True))
            self.forward_layernorms.append(nn.LayerNorm(hidden, eps=1e-8))
            self.forward_layers.append(PointWiseFeedForward(hidden, dropout))
        self.last_layernorm = nn.LayerNorm(hidden, eps=1e-8)
        for name, param in self.named_parameters():
            try:
                nn.init.xavier_normal_(param.data)
            except ValueError:
                pass  # 1-D parameters keep their default init, as in SASRec.pytorch
        self.item_emb.weight.data[0] = 0
        self.pos_emb.weight.data[0] = 0

    def log2feats(self, seqs: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded item ids -> (B, L, d) sequence states."""
        x = self.item_emb(seqs) * self.item_emb.embedding_dim**0.5  # (B, L, d)
        positions = torch.arange(1, seqs.shape[1] + 1, device=seqs.device).expand_as(seqs)
        positions = positions * (seqs != 0)
        keep = (seqs != 0).unsqueeze(-1)  # (B, L, 1): SASRec's timeline mask
        x = self.emb_dropout(x + self.pos_emb(positions)) * keep
        length = x.shape[1]
        causal = ~torch.tril(torch.ones(length, length, dtype=torch.bool, device=x.device))
        for i in range(len(self.attention_layers)):
            q = self.attention_layernorms[i](x)
            attended, _ = self.attention_layers[i](q, x, x, attn_mask=causal, need_weights=False)
            x = q + attended
            x = self.forward_layers[i](self.forward_layernorms[i](x)) * keep
        return self.last_layernorm(x)

    def forward(self, seqs, pos, neg):
        feats = self.log2feats(seqs)
        pos_logits = (feats * self.item_emb(pos)).sum(-1)
        neg_logits = (feats * self.item_emb(neg)).sum(-1)
        return pos_logits, neg_logits

    def loss(self, seqs, pos, neg) -> torch.Tensor:
        pos_logits, neg_logits = self(seqs, pos, neg)
        mask = pos != 0
        bce = nn.functional.binary_cross_entropy_with_logits
        return bce(pos_logits[mask], torch.ones_like(pos_logits[mask])) + bce(
            neg_logits[mask], torch.zeros_like(neg_logits[mask])
        )

    # ---- the package's scorer interface (right-padded input from the evaluator)

    def _last_state(self, item_seq: torch.Tensor) -> torch.Tensor:
        seqs = _right_to_left(item_seq[:, -self.max_len :])
        return self.log2feats(seqs)[:, -1]  # (B, d)

    def full_sort_predict(self, user_ids, item_seq):
        return self._last_state(item_seq) @ self.item_emb.weight.T  # (B, I+1)

    def predict_candidates(self, user_ids, item_seq, candidates):
        state = self._last_state(item_seq)  # (B, d)
        return (self.item_emb(candidates) * state[:, None, :]).sum(-1)  # (B, C)


def _right_to_left(item_seq: torch.Tensor) -> torch.Tensor:
    """Right-padded (B, L) -> left-padded (B, L), keeping order."""
    lengths = (item_seq != 0).sum(1, keepdim=True)  # (B, 1)
    length = item_seq.shape[1]
    shift = length - lengths  # (B, 1)
    index = (torch.arange(length, device=item_seq.device)[None, :] - shift) % length
    out = torch.gather(item_seq, 1, index)
    return torch.where(torch.arange(length, device=item_seq.device)[None, :] >= shift, out, 0)


class SASRecSampler:
    """SASRec.pytorch's WarpSampler, single process: random users, the last max_len training
    items (left-padded), next-item positives and one random negative outside the user's set."""

    def __init__(self, train_sequences: list[np.ndarray], num_items: int, max_len: int, seed: int) -> None:
        self.sequences = [s for s in train_sequences if len(s) > 1]
        self.num_items = num_items
        self.max_len = max_len
        self.rng = np.random.default_rng(seed)
        self.sets = [set(s.tolist()) for s in self.sequences]

    def batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        seq = np.zeros((batch_size, self.max_len), np.int64)
        pos = np.zeros((batch_size, self.max_len), np.int64)
        neg = np.zeros((batch_size, self.max_len), np.int64)
        users = self.rng.integers(0, len(self.sequences), batch_size)
        for b, u in enumerate(users):
            items = self.sequences[u]
            inputs, targets = items[:-1][-self.max_len :], items[1:][-self.max_len :]
            n = len(inputs)
            seq[b, -n:] = inputs
            pos[b, -n:] = targets
            negatives = self.rng.integers(1, self.num_items + 1, n)
            for j in range(n):
                while negatives[j] in self.sets[u]:
                    negatives[j] = self.rng.integers(1, self.num_items + 1)
            neg[b, -n:] = negatives
        return seq, pos, neg
