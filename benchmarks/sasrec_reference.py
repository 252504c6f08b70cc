"""Reference SASRec models (Kang and McAuley, 2018), written for the benchmarks.

Two public variants, each as its source writes it:

* ``variant="pmixer"``: SASRec.pytorch (pmixer). Item and position embeddings (positions
  1..L, 0 for padding), items scaled by sqrt(d); 2 blocks of [LayerNorm -> single-head
  causal self-attention, residual onto the *normalised* input; LayerNorm -> point-wise FFN
  (d -> d -> d, ReLU, dropout) + residual]; a final LayerNorm; xavier-normal init of every
  matrix. Trained with binary cross-entropy of one positive and one sampled negative per
  position (``loss_bce``), Adam 1e-3, batch 128.
* ``variant="ce"``: the SASRec of MTandHJ/CE-SCE-LLMRec (``SASRec/main.py``), the strongest
  public SASRec on our Beauty file: positions 0..L-1 for every slot of the left-padded
  window, the attention residual onto the *un-normalised* stream, xavier-normal init of the
  embeddings and linear layers (biases 0, the point-wise convolutions keep torch's init),
  and the exact cross-entropy over all items at every position (``loss_ce``); Adam 5e-4,
  batch 512, dropout 0.6, width 64 (``benchmarks/sasrec_beauty.py --recipe ce``).

Both read a window of the last ``max_len`` items, left-padded to exactly ``max_len``, so the
most recent item always sits at the last position, in training and in evaluation alike. They
implement the package's scorer interface (``full_sort_predict``, ``predict_candidates``), so
the package's evaluator scores them on the same candidates as our models.

Not part of the package: baselines to measure against in the same run.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from llm_recommender.models.stage_a_model import chunked_cross_entropy


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
    """SASRec over items ``1..num_items`` (0 is padding); see the module docstring for the variants."""

    def __init__(self, num_items: int, hidden: int = 50, num_blocks: int = 2, num_heads: int = 1,
                 dropout: float = 0.5, max_len: int = 50, variant: str = "pmixer") -> None:
        super().__init__()
        if variant not in ("pmixer", "ce"):
            raise ValueError(f"variant must be 'pmixer' or 'ce', got {variant!r}")
        self.variant = variant
        self.num_items = num_items
        self.max_len = max_len
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        # pmixer: position 0 is padding's; ce: every slot 0..L-1 has a position.
        self.pos_emb = nn.Embedding(max_len + 1, hidden, padding_idx=0) if variant == "pmixer" else nn.Embedding(max_len, hidden)
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
        if variant == "pmixer":
            for param in self.parameters():
                if param.ndim >= 2:
                    nn.init.xavier_normal_(param.data)  # 1-D parameters keep torch's init
        else:
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_normal_(module.weight)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, nn.Embedding):
                    nn.init.xavier_normal_(module.weight)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()  # never an input (masked) nor a class
            if variant == "pmixer":
                self.pos_emb.weight[0].zero_()

    def log2feats(self, seqs: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded item ids -> (B, L, d) sequence states."""
        keep = (seqs != 0).unsqueeze(-1)  # (B, L, 1): SASRec's timeline mask
        x = self.item_emb(seqs) * self.item_emb.embedding_dim**0.5  # (B, L, d)
        if self.variant == "pmixer":
            positions = torch.arange(1, seqs.shape[1] + 1, device=seqs.device).expand_as(seqs) * (seqs != 0)
        else:
            positions = torch.arange(seqs.shape[1], device=seqs.device).expand_as(seqs)
        x = self.emb_dropout(x + self.pos_emb(positions)) * keep
        length = x.shape[1]
        causal = ~torch.tril(torch.ones(length, length, dtype=torch.bool, device=x.device))
        for i in range(len(self.attention_layers)):
            q = self.attention_layernorms[i](x)
            attended, _ = self.attention_layers[i](q, x, x, attn_mask=causal, need_weights=False)
            x = (q if self.variant == "pmixer" else x) + attended
            x = self.forward_layers[i](self.forward_layernorms[i](x)) * keep
        return self.last_layernorm(x)

    def loss_bce(self, seqs: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of each position's positive and one negative (SASRec's loss)."""
        feats = self.log2feats(seqs)  # (B, L, d)
        pos_logits = (feats * self.item_emb(pos)).sum(-1)  # (B, L)
        neg_logits = (feats * self.item_emb(neg)).sum(-1)  # (B, L)
        mask = pos != 0
        bce = nn.functional.binary_cross_entropy_with_logits
        return bce(pos_logits[mask], torch.ones_like(pos_logits[mask])) + bce(
            neg_logits[mask], torch.zeros_like(neg_logits[mask])
        )

    def loss_ce(self, seqs: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over all items at every non-padding position (the package's exact
        chunked softmax: the same values and gradients as ``F.cross_entropy`` over
        ``feats @ item_emb.weight[1:].T``, 3x faster on a CPU, where log_softmax's backward is slow)."""
        feats = self.log2feats(seqs)  # (B, L, d)
        mask = pos != 0
        return chunked_cross_entropy(feats[mask], self.item_emb.weight, pos[mask], chunk_size=1 << 20)

    # ---- the package's scorer interface (right-padded input from the evaluator)

    def _last_state(self, item_seq: torch.Tensor) -> torch.Tensor:
        seqs = left_pad(item_seq, self.max_len)
        return self.log2feats(seqs)[:, -1]  # (B, d)

    def full_sort_predict(self, user_ids, item_seq):
        return self._last_state(item_seq) @ self.item_emb.weight.T  # (B, I+1)

    def predict_candidates(self, user_ids, item_seq, candidates):
        state = self._last_state(item_seq)  # (B, d)
        return (self.item_emb(candidates) * state[:, None, :]).sum(-1)  # (B, C)


def left_pad(item_seq: torch.Tensor, max_len: int) -> torch.Tensor:
    """Right-padded ``(B, T)`` -> left-padded ``(B, max_len)`` holding each row's last
    ``max_len`` items in order: the most recent item always at column ``max_len - 1``, the
    position SASRec trains it at (whatever width the evaluator's batch has)."""
    lengths = (item_seq != 0).sum(1)  # (B,)
    columns = torch.arange(max_len, device=item_seq.device)[None, :]  # (1, L)
    source = lengths[:, None] - max_len + columns  # (B, L): index into the row, < 0 = padding
    inside = source >= 0
    out = torch.gather(item_seq, 1, source.clamp(min=0, max=max(item_seq.shape[1] - 1, 0)))
    return torch.where(inside, out, torch.zeros_like(out))


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


class ShuffledEpochs:
    """CE-SCE-LLMRec's training source: every epoch, each user once in a new random order,
    in batches (the last one partial) of (the last max_len inputs, their next items),
    left-padded."""

    def __init__(self, train_sequences: list[np.ndarray], max_len: int, seed: int) -> None:
        sequences = [s for s in train_sequences if len(s) > 1]
        self.rng = np.random.default_rng(seed)
        self.inputs = np.zeros((len(sequences), max_len), np.int64)
        self.targets = np.zeros((len(sequences), max_len), np.int64)
        for row, items in enumerate(sequences):
            inputs, targets = items[:-1][-max_len:], items[1:][-max_len:]
            self.inputs[row, max_len - len(inputs):] = inputs
            self.targets[row, max_len - len(targets):] = targets

    def epoch(self, batch_size: int):
        order = self.rng.permutation(len(self.inputs))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            yield torch.from_numpy(self.inputs[rows]), torch.from_numpy(self.targets[rows])
