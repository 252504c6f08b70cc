"""The Stage A model: soft user/item tokens through a decoder LLM, tied scores over all items.

Read top to bottom (nanoGPT style). Shapes: B sequences, T input items, S = T + 1 output
positions with the user token (T without), d_model the backbone width, d the ID-table width
(``model.embedding_dim``), I items, N the positions that carry a target in a batch.

    [user, item_1 .. item_T]                       ids
      -> E_user / E_item  -> user_proj / item_proj   (B, S, d_model) soft tokens
      -> LLM(inputs_embeds, attention_mask)          (B, S, d_model) hidden states
      -> out_proj                                    (B, S, d)       states
      -> states @ E_item.T                           (B, S, I+1)     scores (tied table)

Losses (each weighted by ``stage_a.loss_weights``, logged separately):

- ``cross_entropy``: next item at every non-padding position. ``stage_a.ce.mode: full`` is the
  exact softmax over all I items, computed in chunks of positions with a hand-written backward
  that recomputes each chunk's logits, so neither the forward nor the backward ever holds more
  than one chunk x I logits (``ce.chunk_size``, lowered to fit ``ce.chunk_memory_mb``).
  ``sampled`` scores the positive against ``ce.num_sampled`` negatives shared by the batch,
  drawn from a proposal q (uniform, or popularity after :meth:`StageAModel.set_item_sampling_distribution`),
  with log-Q correction and accidental hits masked.
  Trade-off: full is exact and costs O(N x I x d) per step, sampled O(N x K x d); sampled is
  biased for small K even with log-Q (the correction fixes the logits in expectation, not the
  loss) and is the only mode that keeps the item table's gradient sparse. Measured on a busy
  2-core CPU, 1 thread, 1,600 positions, d=64, 349K items, forward + backward: full chunked
  19.5 s and 1.0 GB above the inputs (default 1 GiB budget; unchunked F.cross_entropy 19.3 s
  and 8.5 GB); sampled with 1,024 negatives 0.3 s and 0.25 GB (0.06 GB with sparse tables).
- ``context_bpr``: the state at each target position vs. the positive and
  ``stage_a.collaborative.negative_samples`` uniform negatives (never the positive).
- ``user_bpr``: the user's table row (d, not projected) vs. the same positive and negatives.
- ``l2``: the spec's ``||E_user||^2 + ||E_item||^2``, squared Frobenius norms of the whole
  tables (the padding row is zero); the total adds
  ``loss_weights.regularization * embeddings.lambda_c * l2``. Its gradient reaches every row,
  so it is refused with sparse tables (``embeddings.sparse``), and it is computed only when
  its weight is on (0 is logged otherwise).

The total: ``collaborative * cross_entropy + cf_bpr * (context_bpr * L_context + user_bpr *
L_user) + regularization * lambda_c * l2`` (``context_bpr`` and ``user_bpr``, relative weights
inside the spec's ``cf_bpr``, default to 1).
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..errors import CheckpointError, ConfigError
from .backbone import apply_finetune_mode, load_backbone
from .embeddings import IDEmbeddings, init_orthogonal

LOSS_KEYS = ("loss", "cross_entropy", "context_bpr", "user_bpr", "l2")


# --------------------------------------------------------------------------------------------
# Loss functions (pure: tensors in, tensors out)
# --------------------------------------------------------------------------------------------


class _ChunkedSoftmaxCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``states @ weight.T`` (column 0 excluded) without the full logits.

    ``dL/dlogits = softmax - (1 - eps) target - eps / I`` (target: one-hot, or the weights of
    soft targets), then ``dstates = dlogits @ weight`` and ``dweight += dlogits.T @ states``.
    When the whole batch fits in one chunk, forward keeps that chunk's softmax for backward
    (one matmul and one exp pass fewer: the common case for catalogues up to ~100K items);
    otherwise forward keeps only each position's log-sum-exp and backward recomputes one chunk
    of logits at a time, so memory stays at one chunk x I.
    """

    @staticmethod
    def forward(ctx, states, weight, targets, target_weights, chunk_size, label_smoothing):
        num_positions = states.shape[0]
        num_classes = weight.shape[0] - 1  # real items 1..I
        # targets (N, M) with target_weights (N, M) summing to 1 per row (M = 1: the plain target).
        # One target: its logit is linear in the states, no logits needed. Several: picked from
        # each chunk's logits (an (N, M, d) gather of item rows would cost M times the states).
        if targets.shape[1] == 1:
            target_logit = ((states[:, None, :] * weight[targets]).sum(-1) * target_weights).sum(-1)  # (N,)
        else:
            target_logit = states.new_empty(num_positions)  # (N,) filled chunk by chunk
        mean_logit = states @ weight[1:].mean(dim=0) if label_smoothing > 0 else None  # (N,)
        lse = states.new_empty(num_positions)  # (N,)
        ctx.probabilities = None
        ctx.lease = _Lease()  # holds the logits workspace until backward has used it
        single_chunk = num_positions <= chunk_size and any(ctx.needs_input_grad[:2])
        # |logit| <= |state| * max |item row| (Cauchy-Schwarz): where that bound keeps exp() far
        # from fp32 overflow and underflow, the softmax needs no max-subtraction pass.
        bound = states.norm(dim=1) * weight.norm(dim=1).max()  # (N,)
        for start in range(0, num_positions, chunk_size):
            end = min(start + chunk_size, num_positions)
            logits = _LOGITS_WORKSPACE.take(end - start, weight.shape[0], states, ctx.lease)  # (c, I+1)
            torch.mm(states[start:end], weight.T, out=logits)
            if targets.shape[1] > 1:
                shares = target_weights[start:end]  # (c, M); a share of 0 may hold id 0
                picked = logits.gather(1, targets[start:end])  # (c, M)
                target_logit[start:end] = torch.where(shares > 0, picked * shares, 0.0).sum(1)
            logits[:, 0] = float("-inf")  # padding is never a prediction
            if float(bound[start:end].max()) < _EXP_SAFE:
                peak = logits.new_zeros(end - start, 1)  # (c, 1)
                logits.exp_()  # (c, I+1) unnormalised probabilities, in place
            else:
                peak = logits.max(dim=1, keepdim=True).values  # (c, 1)
                logits.sub_(peak).exp_()
            total = logits.sum(dim=1, keepdim=True)  # (c, 1)
            lse[start:end] = (peak + total.log()).squeeze(1)
            if single_chunk:
                ctx.probabilities = logits.div_(total)  # (N, I+1) softmax, reused by backward
            del logits
        if ctx.probabilities is None:
            ctx.lease = None  # backward recomputes (into the workspace again)
        nll = lse - target_logit  # (N,)
        per_position = nll if mean_logit is None else (1 - label_smoothing) * nll + label_smoothing * (lse - mean_logit)
        ctx.save_for_backward(states, weight, targets, target_weights, lse)
        ctx.chunk_size = chunk_size
        ctx.label_smoothing = label_smoothing
        ctx.num_classes = num_classes
        return per_position.mean()

    @staticmethod
    def backward(ctx, grad_output):
        states, weight, targets, target_weights, lse = ctx.saved_tensors
        need_states, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        eps = ctx.label_smoothing
        scale = float(grad_output) / states.shape[0]  # applied to the (c, d) products, not the logits
        grad_states = torch.zeros_like(states) if need_states else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        kept, ctx.probabilities = ctx.probabilities, None  # used once: backward edits it in place
        lease = ctx.lease or _Lease()
        for start in range(0, states.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, states.shape[0])
            chunk = states[start:end]  # (c, d)
            if kept is not None:
                grad_logits = kept  # (c, I+1) softmax from forward
            else:
                grad_logits = _LOGITS_WORKSPACE.take(end - start, weight.shape[0], states, lease)  # (c, I+1)
                torch.mm(chunk, weight.T, out=grad_logits)
                grad_logits[:, 0] = float("-inf")
                grad_logits.sub_(lse[start:end, None]).exp_()  # softmax, in place
            rows = torch.arange(end - start, device=grad_logits.device)
            # One index per row and target column: a plain index_put (deterministic on CUDA,
            # unlike scatter_add); column by column, so a repeated id accumulates.
            shares = target_weights[start:end] * (1 - eps)  # (c, M)
            for column in range(targets.shape[1]):
                grad_logits[rows, targets[start:end, column]] -= shares[:, column]
            if eps > 0:
                grad_logits[:, 1:] -= eps / ctx.num_classes
            if need_states:
                torch.mm(grad_logits, weight, out=grad_states[start:end])  # (c, d)
                grad_states[start:end].mul_(scale)
            if need_weight:
                grad_weight.addmm_(grad_logits.T, chunk, alpha=scale)  # (I+1, d)
            del grad_logits
        ctx.lease = None  # the workspace is free again
        return grad_states, grad_weight, None, None, None, None


# exp(60) = 1.1e26: a sum of up to e^28 such terms stays finite in fp32 (max 3.4e38), and
# exp(-60) = 8.8e-27 stays a normal float.
_EXP_SAFE = 60.0


class _Lease:
    """Marks the logits workspace as in use for as long as it lives (see :class:`_Workspace`)."""


class _Workspace:
    """One reusable CPU buffer for a chunk of logits.

    A chunk of logits is large (3,500 positions x 12K items = 170 MB on Beauty at batch 512),
    and a fresh CPU tensor that size is fresh pages every step: the page faults cost as much as
    the matmul that fills them (measured on a 2-core EPYC, 1 thread: 135 ms into a reused
    buffer vs 266 ms into a new one; whole training step -25%). CUDA's caching allocator
    already reuses memory, so only CPU tensors use this. The buffer is leased to one
    forward/backward at a time (a second call while it is leased gets a fresh tensor), and a
    lease dropped without backward (no gradient needed, graph freed) frees it.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, Any]] = {}

    def take(self, rows: int, cols: int, like: torch.Tensor, lease: _Lease) -> torch.Tensor:
        if like.device.type != "cpu":
            return like.new_empty(rows, cols)
        key = (like.device, like.dtype)
        size = rows * cols
        buffer, holder = self.buffers.get(key, (None, None))
        holder = holder() if holder is not None else None
        if holder is not None and holder is not lease:
            return like.new_empty(rows, cols)  # leased to a call still in flight
        if buffer is None or buffer.numel() < size:
            buffer = like.new_empty(size)
        self.buffers[key] = (buffer, weakref.ref(lease))
        return buffer[:size].view(rows, cols)

    def clear(self) -> None:
        """Drop every buffer (their memory returns to the system)."""
        self.buffers.clear()


_LOGITS_WORKSPACE = _Workspace()


def chunk_positions(num_items: int, chunk_size: int, chunk_memory_mb: float) -> int:
    """Positions per chunk: ``chunk_size``, lowered so that one chunk's logits and their
    temporary (two fp32 ``c x (I+1)`` buffers) fit in ``chunk_memory_mb``."""
    fit = int(chunk_memory_mb * 2**20 // (2 * 4 * (num_items + 1)))
    return max(1, min(chunk_size, fit))


def chunked_cross_entropy(
    states: torch.Tensor,
    item_weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    label_smoothing: float = 0.0,
    target_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact mean softmax cross-entropy over items ``1..I``, chunked over positions.

    Args:
        states: ``(N, d)`` query states (cast to fp32).
        item_weight: ``(I+1, d)`` item table; row 0 (padding) is never a class.
        targets: ``(N,)`` item ids in ``1..I``; or ``(N, M)`` ids with ``target_weights``.
        chunk_size: positions whose logits exist at once (forward and backward).
        label_smoothing: smoothing mass spread uniformly over the I real items.
        target_weights: ``(N, M)`` soft-target weights, each row summing to 1 (a column of
            weight 0 may hold any id, 0 included); None: one target per position.

    Returns:
        Scalar mean over the N positions; gradients flow to ``states`` and ``item_weight``
        and equal those of the unchunked ``F.cross_entropy`` up to float rounding.
    """
    if states.shape[0] == 0:
        return states.sum() * 0.0 + item_weight.sum() * 0.0
    if target_weights is None:
        targets = targets[:, None]  # (N, 1)
        target_weights = torch.ones(targets.shape, device=states.device)  # (N, 1)
    device_type = states.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        return _ChunkedSoftmaxCrossEntropy.apply(
            states.float(), item_weight.float(), targets, target_weights.float(), int(chunk_size), float(label_smoothing)
        )


def future_soft_targets(targets: torch.Tensor, count: int, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft targets that share each position's mass with the next ``count`` targets of its row.

    Args:
        targets: ``(B, S)`` next-item targets aligned with the output positions (0 = none); the
            target of position s+k is the item k steps after position s's own.
        count: later targets F per position.
        weight: mass on the later targets, split evenly among those the row has (a position
            near the end of its window has fewer; with none, its own target keeps all).

    Returns:
        ``(B, S, 1+F)`` item ids (column 0 the position's own target) and their weights, each
        row summing to 1 where the position has a target.
    """
    length = targets.shape[1]
    padded = F.pad(targets, (0, count))  # (B, S+F)
    later = torch.stack([padded[:, k : k + length] for k in range(1, count + 1)], dim=-1)  # (B, S, F)
    present = (later != 0).float()  # (B, S, F)
    available = present.sum(-1, keepdim=True)  # (B, S, 1)
    later_weights = weight * present / available.clamp_min(1)  # (B, S, F)
    own = 1.0 - later_weights.sum(-1, keepdim=True)  # (B, S, 1)
    return torch.cat([targets[..., None], later], dim=-1), torch.cat([own, later_weights], dim=-1)


def tied_soft_targets(targets: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft targets for events whose order within a timestamp is unknown.

    A position whose target is one of a run of same-timestamp events has, as far as the data
    knows, any of the run's events still to come as its next item: its mass is split evenly
    over its own target and the run's later targets in the row. That is the expected loss under
    a random order of the run (``stage_a.shuffle_tied_events``), without the noise of one draw.

    Args:
        targets: ``(B, S)`` next-item targets aligned with the output positions (0 = none).
        groups: ``(B, S)`` each target's run id (runs are contiguous in a row; 0 = none).

    Returns:
        ``(B, S, M)`` item ids (column 0 the position's own target) and weights, each row
        summing to 1 where the position has a target; M the longest remaining run (>= 1).
    """
    length = targets.shape[1]
    padded_targets = F.pad(targets, (0, length))  # (B, 2S)
    padded_groups = F.pad(groups, (0, length))  # (B, 2S)
    ids, members = [targets], [targets != 0]
    for offset in range(1, length):
        same = (padded_groups[:, offset : offset + length] == groups) & members[-1]  # (B, S)
        if not bool(same.any()):
            break
        ids.append(padded_targets[:, offset : offset + length])
        members.append(same)
    ids_t = torch.stack(ids, dim=-1)  # (B, S, M)
    present = torch.stack(members, dim=-1).float()  # (B, S, M)
    return ids_t, present / present.sum(-1, keepdim=True).clamp_min(1.0)


def sampled_softmax_cross_entropy(
    states: torch.Tensor,
    positive_embeddings: torch.Tensor,
    negative_embeddings: torch.Tensor,
    targets: torch.Tensor,
    negatives: torch.Tensor,
    log_q_targets: torch.Tensor | None = None,
    log_q_negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax over the positive and K negatives shared by all positions (log-Q corrected).

    Args:
        states: ``(N, d)`` query states.
        positive_embeddings: ``(N, d)`` rows of the targets.
        negative_embeddings: ``(K, d)`` rows of the shared negatives.
        targets: ``(N,)`` target ids; negatives equal to a position's target are masked out.
        negatives: ``(K,)`` negative ids.
        log_q_targets: ``(N,)`` log proposal probability of each target, or None (no correction).
        log_q_negatives: ``(K,)`` log proposal probability of each negative, or None.

    Returns:
        Scalar mean over positions. With every item as a negative and a uniform q it equals the
        full cross-entropy (the constant correction cancels and the accidental hit is masked).
    """
    positive_logits = (states * positive_embeddings).sum(-1)  # (N,)
    negative_logits = states @ negative_embeddings.T  # (N, K)
    if log_q_targets is not None and log_q_negatives is not None:
        positive_logits = positive_logits - log_q_targets
        negative_logits = negative_logits - log_q_negatives[None, :]
    accidental_hits = negatives[None, :] == targets[:, None]  # (N, K)
    negative_logits = negative_logits.masked_fill(accidental_hits, float("-inf"))
    logits = torch.cat([positive_logits[:, None], negative_logits], dim=1)  # (N, 1+K)
    labels = torch.zeros(states.shape[0], dtype=torch.long, device=states.device)
    return F.cross_entropy(logits.float(), labels)


def sample_negatives(
    positives: torch.Tensor, num_items: int, num_negatives: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniform negatives over ``1..I`` that never equal their positive (no rejection loop).

    Draws r uniform in ``1..I-1`` and maps ``r >= positive`` to ``r + 1``: exactly uniform over
    the I - 1 items other than the positive.

    Args:
        positives: ``(N,)`` item ids in ``1..I``.
        num_items: I (at least 2).
        num_negatives: K per positive.
        generator: optional torch generator (default: torch's global RNG).

    Returns:
        ``(N, K)`` int64 negatives.
    """
    if num_items < 2:
        raise ConfigError(
            f"BPR needs at least 2 items to draw a negative, the catalogue has {num_items}: "
            "set stage_a.collaborative.use_bpr_loss: false"
        )
    draws = torch.randint(
        1, num_items, (positives.shape[0], num_negatives), device=positives.device, generator=generator
    )  # (N, K) in 1..I-1
    return draws + (draws >= positives[:, None]).long()


def bpr_loss(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Mean ``-log sigmoid(s_pos - s_neg)`` over positions and negatives.

    Args:
        query: ``(N, d)``; positive: ``(N, d)``; negatives: ``(N, K, d)``.
    """
    positive_scores = (query * positive).sum(-1)  # (N,)
    negative_scores = torch.einsum("nd,nkd->nk", query, negatives)  # (N, K)
    return F.softplus(negative_scores - positive_scores[:, None]).mean()  # = -logsigmoid(pos - neg)


def info_nce(first: torch.Tensor, second: torch.Tensor, temperature: float, cosine: bool = False) -> torch.Tensor:
    """DuoRec's contrastive loss: ``(n, d)`` states and their positives ``(n, d)``.

    Each of the 2n states must pick its partner (row i of the other tensor) among the 2n - 1
    others by dot product (``cosine``: of the L2-normalised states) over ``temperature``; a
    scalar mean (0 with fewer than 2 rows).
    """
    count = first.shape[0]
    if count < 2:
        return first.sum() * 0.0 + second.sum() * 0.0
    states = torch.cat([first, second]).float()  # (2n, d)
    if cosine:
        states = F.normalize(states, dim=1)
    logits = states @ states.T / temperature  # (2n, 2n)
    logits = logits.masked_fill(torch.eye(2 * count, dtype=torch.bool, device=logits.device), float("-inf"))
    partner = torch.cat([torch.arange(count, 2 * count), torch.arange(count)]).to(logits.device)  # (2n,)
    return F.cross_entropy(logits, partner)


def keep_recent(item_seq: torch.Tensor, max_len: int) -> torch.Tensor:
    """The most recent ``max_len`` items of each row, right-padded (input padding left or right)."""
    if item_seq.shape[1] <= max_len:
        return item_seq
    mask = item_seq != 0  # (B, T)
    rank_from_end = mask.flip(1).long().cumsum(1).flip(1)  # (B, T) 1 at the last item
    keep = mask & (rank_from_end <= max_len)
    order = torch.argsort((~keep).long(), dim=1, stable=True)[:, :max_len]  # kept items first
    kept = item_seq.gather(1, order)  # (B, max_len)
    return kept.masked_fill(~keep.gather(1, order), 0)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class StageAModel(nn.Module):
    """ID tables + projections + decoder backbone + ``out_proj``, scored against the item table.

    Args:
        config: the whole :class:`Config` (reads ``model``, ``embeddings``, ``stage_a``).
        num_users: known users U (ids 1..U; 0 is the learned unknown user).
        num_items: items I (ids 1..I; 0 is padding).
        backbone: an already built backbone (its width must match); None builds it with
            :func:`load_backbone` and :func:`apply_finetune_mode`.
    """

    def __init__(self, config: Config, num_users: int, num_items: int, backbone: nn.Module | None = None):
        super().__init__()
        model_config = config.model
        self.config = config
        self.num_users = num_users
        self.num_items = num_items
        self.use_user_token = model_config.use_user_token
        self.share_user_token = model_config.share_user_token
        self.attend_padding = model_config.attend_padding
        self.max_seq_len = model_config.max_seq_len
        self.position_anchor = model_config.position_anchor
        ce = config.stage_a.ce
        weights = config.stage_a.loss_weights
        if config.embeddings.sparse and ce.mode == "full" and weights.collaborative > 0:
            raise ConfigError(
                "embeddings.sparse=true with stage_a.ce.mode=full: the full softmax gives every item "
                "row a gradient, so the item table's gradient is dense; use stage_a.ce.mode: sampled "
                "(or embeddings.sparse: false)"
            )
        if config.embeddings.sparse and weights.regularization > 0 and config.embeddings.lambda_c > 0:
            raise ConfigError(
                "embeddings.sparse=true with stage_a.loss_weights.regularization > 0: the spec's L2 "
                "lambda_c * (||E_user||^2 + ||E_item||^2) covers the whole tables, so its gradient is dense; "
                "set stage_a.loss_weights.regularization: 0 (or embeddings.sparse: false)"
            )
        if backbone is None:
            backbone, d_model, info = load_backbone(model_config)
            backbone = apply_finetune_mode(backbone, model_config)
        else:
            d_model = int(backbone.config.hidden_size)
            info = {"name": "given", "family": backbone.config.model_type, "source": "given"}
        self.backbone = backbone
        self.backbone_info = info
        self.finetune_mode = model_config.finetune_mode
        self.d_model = d_model
        self.embedding_dim = model_config.embedding_dim
        self.embeddings = IDEmbeddings(
            num_users,
            num_items,
            model_config.embedding_dim,
            d_model,
            init_std=config.embeddings.init_std,
            sparse=config.embeddings.sparse,
            token_scale=model_config.soft_token_scale,
            projection_init=model_config.projection_init,
        )
        self.embedding_dropout = nn.Dropout(model_config.embedding_dropout)
        # model.direction_token: added to the input tokens of windows read in reverse (training
        # only); zero at the start, so the forward reading is the plain network.
        self.direction_embedding = nn.Parameter(torch.zeros(d_model)) if model_config.direction_token else None
        self.out_proj = nn.Linear(d_model, model_config.embedding_dim)
        if model_config.projection_init == "orthogonal":
            init_orthogonal(self.out_proj)
        # model.item_bias: b_i added to every score of item i (row 0, padding, never scored).
        self.item_bias = nn.Parameter(torch.zeros(num_items + 1)) if model_config.item_bias else None
        self.tie_output_projection = model_config.tie_output_projection
        if self.tie_output_projection:
            # Kept (checkpoint layout unchanged) but unused: frozen so DDP sees no idle gradient.
            self.out_proj.requires_grad_(False)
        # Log of the sampled-softmax proposal over items (index 0 never drawn); uniform until
        # set_item_sampling_distribution. Not persistent: the trainer derives it from the data.
        uniform = torch.full((num_items + 1,), -math.log(num_items))
        uniform[0] = float("-inf")
        self.register_buffer("sampling_log_q", uniform, persistent=False)
        self.sampling_is_uniform = True
        # Item co-occurrence neighbours fused into the scores (model.item_knn): attached by the
        # trainer after training, or by load_checkpoint; not an nn.Module state (no gradient).
        self.item_knn = None
        self.item_knn_weight = 0.0
        # evaluation.item_readings / item_readings_weight: set by the evaluator and the
        # recommender for the duration of their scoring (user_state), never by training.
        self.item_readings = 0
        self.item_readings_weight = 0.0
        self._freeze_parameters(config)
        self.train()

    def attach_item_knn(self, table, weight: float) -> None:
        """Fuse an :class:`~llm_recommender.models.item_knn.ItemCooccurrence` table into the
        scores: ``logits + weight * knn`` (``table=None`` detaches)."""
        if table is not None and table.num_items != self.num_items:
            raise ConfigError(f"item neighbour table has {table.num_items} items, the model {self.num_items}")
        self.item_knn = table
        self.item_knn_weight = float(weight) if table is not None else 0.0

    def _freeze_parameters(self, config: Config) -> None:
        # A parameter that never gets a gradient breaks DDP ("Expected to have finished
        # reduction"): without the user token nothing reads user_proj, and the user table is
        # read only by the user BPR and the L2 term.
        # Without the user token and the user BPR the user table is read by nothing but the L2
        # term, which would only shrink it: frozen too. model.freeze_projections freezes the
        # projections whatever reads them.
        if config.model.freeze_projections:
            for proj in (self.embeddings.item_proj, self.embeddings.user_proj, self.out_proj):
                proj.requires_grad_(False)
        if self.use_user_token:
            return
        self.embeddings.user_proj.requires_grad_(False)
        stage_a = config.stage_a
        if not (stage_a.collaborative.use_bpr_loss and stage_a.loss_weights.user_bpr_weight > 0):
            self.embeddings.user_embeddings.requires_grad_(False)

    # ---- data flow -------------------------------------------------------------------------

    def _backbone_dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def forward(
        self, user_ids: torch.Tensor, item_seq: torch.Tensor, reversed_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """States at every position: ``(B,)``, ``(B, T)`` -> ``(B, S, d)``.

        The attention mask is ``item_seq != 0`` (the user token always visible); position ids
        count visible tokens, so left and right padding give the same states.
        ``reversed_rows`` (B,), 1 for a window read in reverse: with ``model.direction_token``
        its learned vector is added to those rows' item tokens (training only).
        """
        if self.attend_padding:
            return self._forward_padded_window(user_ids, item_seq, reversed_rows)
        item_mask = item_seq != 0  # (B, T)
        tokens = self._direction(self.embeddings.item_tokens(item_seq), reversed_rows, item_mask)  # (B, T, d_model)
        if self.use_user_token:
            tokens = self._prepend_user_token(user_ids, tokens)  # (B, T+1, d_model)
            visible = torch.ones_like(item_mask[:, :1])  # (B, 1)
            mask = torch.cat([visible, item_mask], dim=1)  # (B, T+1)
        else:
            mask = item_mask  # (B, T)
        tokens = self.embedding_dropout(tokens)
        position_ids = (mask.long().cumsum(dim=1) - 1).clamp_min(0)  # (B, S)
        if self.position_anchor == "end":
            # The last visible token sits at position max_seq_len (- 1 without the user token),
            # whatever the history length.
            longest = self.max_seq_len + (1 if self.use_user_token else 0)
            position_ids = position_ids + (longest - mask.long().sum(dim=1, keepdim=True)).clamp_min(0)
        output = self.backbone(
            inputs_embeds=tokens.to(self._backbone_dtype()),
            attention_mask=mask.long(),
            position_ids=position_ids,
            use_cache=False,
        )
        return self._project_out(output.last_hidden_state)  # (B, S, d)

    def _direction(self, tokens: torch.Tensor, reversed_rows: torch.Tensor | None, item_mask: torch.Tensor) -> torch.Tensor:
        """Item tokens ``(B, T, d_model)`` plus the direction vector on the items (``item_mask``,
        (B, T); padding stays the padding token) of reversed rows."""
        if self.direction_embedding is None or reversed_rows is None:
            return tokens
        flags = reversed_rows.to(tokens.dtype)[:, None] * item_mask.to(tokens.dtype)  # (B, T)
        return tokens + flags[:, :, None] * self.direction_embedding.to(tokens.dtype)

    def _prepend_user_token(self, user_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``(B,)``, ``(B, T, d_model)`` -> ``(B, T+1, d_model)``: the user's soft token first
        (with ``model.share_user_token`` the same learned start token for every user)."""
        if self.share_user_token:
            user_ids = torch.zeros_like(user_ids)
        return torch.cat([self.embeddings.user_tokens(user_ids)[:, None, :], tokens], dim=1)

    def _project_out(self, hidden: torch.Tensor) -> torch.Tensor:
        """Backbone states ``(B, S, d_model)`` -> ``(B, S, d)``, the space of the item table."""
        if self.tie_output_projection:
            weight = self.embeddings.item_proj.weight  # (d_model, d)
            return hidden.to(weight.dtype) @ weight  # SASRec scores with the unscaled embedding
        return self.out_proj(hidden.to(self.out_proj.weight.dtype))

    def _forward_padded_window(
        self, user_ids: torch.Tensor, item_seq: torch.Tensor, reversed_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``model.attend_padding``: SASRec's window. The items are left-padded to exactly
        ``max_seq_len`` slots and every slot is visible to attention (the padding slots carry
        the padding token, item row 0), so the last item always sits at the last position and
        a short history leaves many identical slots attention can rest on. Returns the states
        in ``item_seq``'s own layout, as :meth:`forward` does: ``(B, T)`` -> ``(B, S, d)``."""
        width = self.max_seq_len
        item_mask = item_seq != 0  # (B, T)
        if item_seq.shape[1] > width:
            raise ValueError(f"item_seq has {item_seq.shape[1]} positions, more than model.max_seq_len={width}")
        count = item_mask.sum(dim=1, keepdim=True)  # (B, 1) items per row
        rank = item_mask.long().cumsum(dim=1) - 1  # (B, T) index of each item among its row's items
        slot = (width - count + rank).clamp(0, width - 1)  # (B, T) its slot in the window
        window = torch.zeros(item_seq.shape[0], width, dtype=item_seq.dtype, device=item_seq.device)  # (B, L)
        window.scatter_(1, torch.where(item_mask, slot, 0), torch.where(item_mask, item_seq, 0))
        # (Slot 0 may receive a padding position's write of 0: it is padding unless the row is
        # full, and then no position of the row is padding.)
        tokens = self._direction(self.embeddings.item_tokens(window), reversed_rows, window != 0)  # (B, L, d_model)
        offset = 0
        if self.use_user_token:
            tokens = self._prepend_user_token(user_ids, tokens)  # (B, L+1, d_model)
            offset = 1
        tokens = self.embedding_dropout(tokens)
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)  # (B, S_w)
        output = self.backbone(
            inputs_embeds=tokens.to(self._backbone_dtype()),
            attention_mask=torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device),
            position_ids=positions,
            use_cache=False,
        )
        hidden = self._project_out(output.last_hidden_state)  # (B, S_w, d)
        index = (slot + offset)[:, :, None].expand(-1, -1, hidden.shape[-1])  # (B, T, d)
        states = hidden.gather(1, index) * item_mask[:, :, None]  # (B, T, d) back in item_seq's layout
        if self.use_user_token:
            states = torch.cat([hidden[:, :1], states], dim=1)  # (B, T+1, d)
        return states

    def _output_mask(self, item_seq: torch.Tensor) -> torch.Tensor:
        item_mask = item_seq != 0  # (B, T)
        if not self.use_user_token:
            return item_mask
        return torch.cat([torch.ones_like(item_mask[:, :1]), item_mask], dim=1)  # (B, T+1)

    def user_state(self, user_ids: torch.Tensor, item_seq: torch.Tensor) -> torch.Tensor:
        """State at the last visible position (left or right padding): ``(B, d)``.

        Histories longer than ``model.max_seq_len`` keep their most recent items. With
        :attr:`item_readings` ``k > 0`` (``evaluation.item_readings``, set while scoring) the
        state is ``(1 - w)`` times the history's plus ``w`` times the mean state of its last
        ``k`` items each read alone (:meth:`item_reading_states`; ``w`` is
        :attr:`item_readings_weight`); scores are linear in the state, so this mixes the scores.
        """
        item_seq = keep_recent(item_seq, self.max_seq_len)  # (B, T<=max_seq_len)
        states = self(user_ids, item_seq)  # (B, S, d)
        mask = self._output_mask(item_seq)  # (B, S)
        positions = torch.arange(mask.shape[1], device=mask.device)  # (S,)
        last = (mask.long() * positions).argmax(dim=1)  # (B,) last visible position
        state = states[torch.arange(states.shape[0], device=states.device), last]  # (B, d)
        if self.item_readings > 0 and self.item_readings_weight > 0:
            singles, has_items = self.item_reading_states(user_ids, item_seq, self.item_readings)
            weight = float(self.item_readings_weight)
            mixed = singles if weight >= 1 else (1.0 - weight) * state + weight * singles
            state = torch.where(has_items[:, None], mixed.to(state.dtype), state)
        return state

    def item_reading_states(
        self, user_ids: torch.Tensor, item_seq: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean state of the last ``k`` items of each history, each read alone as a
        one-item history (with the user token, if the model has one): ``(B, d)``, and ``(B,)``
        whether the row has an item at all (an empty row's state is 0).

        A one-item history is what the network reads at the first position of every training
        window, so it predicts from each recent item alone what follows that item: every recent
        item votes separately, where the history's own state is one reading of all of them.
        """
        mask = item_seq != 0  # (B, T)
        count = mask.sum(dim=1)  # (B,)
        from_end = count[:, None] - mask.long().cumsum(dim=1)  # (B, T) 0 at the last item
        picked = mask & (from_end < k)  # (B, T) the last k items
        rows, columns = picked.nonzero(as_tuple=True)  # (P,) each picked item's row and column
        if len(rows) == 0:
            return item_seq.new_zeros((len(item_seq), self.embedding_dim), dtype=torch.float32), count > 0
        states = self(user_ids[rows], item_seq[rows, columns][:, None])[:, -1]  # (P, d)
        total = states.new_zeros((len(item_seq), states.shape[1]))  # (B, d)
        total.index_add_(0, rows, states)
        taken = picked.sum(dim=1).clamp_min(1).to(total.dtype)  # (B,)
        return total / taken[:, None], count > 0

    def scoring_table(self) -> torch.Tensor:
        """The item rows states are scored against: ``(I+1, d)``, or ``(I+1, d+1)`` with
        ``model.item_bias`` (the bias as a last column, to meet a state extended by
        :meth:`scoring_states`), so one dot product gives ``h . e_i + b_i``."""
        table = self.embeddings.item_embeddings.weight
        if self.item_bias is None:
            return table
        return torch.cat([table, self.item_bias[:, None].to(table.dtype)], dim=1)

    def scoring_states(self, states: torch.Tensor) -> torch.Tensor:
        """States ``(..., d)`` as :meth:`scoring_table` expects them: ``(..., d+1)`` with a
        last column of ones under ``model.item_bias``, else unchanged."""
        if self.item_bias is None:
            return states
        return torch.cat([states, states.new_ones(states.shape[:-1] + (1,))], dim=-1)

    @torch.no_grad()
    def init_item_bias(self, counts: torch.Tensor) -> None:
        """``model.item_bias_init: log_popularity``: ``b_i = log(1 + count_i)``, centred over
        the real items; ``counts`` is ``(I+1,)`` (index 0, padding, ignored)."""
        if self.item_bias is None:
            raise ConfigError("model.item_bias_init needs model.item_bias: true")
        counts = torch.as_tensor(counts, dtype=torch.float64)
        if counts.shape != (self.num_items + 1,):
            raise ValueError(f"counts must have shape ({self.num_items + 1},), got {tuple(counts.shape)}")
        bias = counts.clamp_min(0).log1p()
        bias -= bias[1:].mean()
        bias[0] = 0.0
        self.item_bias.copy_(bias.to(self.item_bias.dtype))

    def _scoring_rows(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Rows of :meth:`scoring_table` for ``item_ids (...)`` -> ``(..., d[+1])``, looked up
        through the embedding (sparse tables keep sparse gradients)."""
        rows = self.embeddings.item_embeddings(item_ids)
        if self.item_bias is None:
            return rows
        return torch.cat([rows, self.item_bias[item_ids][..., None].to(rows.dtype)], dim=-1)

    @torch.no_grad()
    def full_sort_predict(self, user_ids: torch.Tensor, item_seq: torch.Tensor) -> torch.Tensor:
        """Scores of every item: ``(B, I+1)`` float32; column 0 (padding) is ``-inf``."""
        state = self.scoring_states(self.user_state(user_ids, item_seq).float())  # (B, d[+1])
        scores = state @ self.scoring_table().float().T  # (B, I+1)
        if self.item_knn is not None and self.item_knn_weight:
            scores += self.item_knn_weight * self.item_knn.full_scores(item_seq).to(scores.device)
        scores[:, 0] = float("-inf")
        return scores

    @torch.no_grad()
    def predict_candidates(
        self, user_ids: torch.Tensor, item_seq: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor:
        """Scores of given candidates: ``(B, C)`` ids -> ``(B, C)``; padding candidates ``-inf``."""
        state = self.scoring_states(self.user_state(user_ids, item_seq).float())  # (B, d[+1])
        rows = self.scoring_table()[candidates]  # (B, C, d[+1])
        scores = torch.einsum("bd,bcd->bc", state, rows.float())  # (B, C)
        if self.item_knn is not None and self.item_knn_weight:
            scores += self.item_knn_weight * self.item_knn.candidate_scores(item_seq, candidates).to(scores.device)
        return scores.masked_fill(candidates == 0, float("-inf"))

    # ---- training --------------------------------------------------------------------------

    def set_item_sampling_distribution(self, counts: torch.Tensor) -> None:
        """Use item popularity as the proposal of sampled softmax.

        Args:
            counts: ``(I+1,)`` (index 0 ignored) or ``(I,)`` interaction counts. Counts below 1
                are raised to 1 so that every item can be drawn and its log q is finite.
        """
        counts = torch.as_tensor(counts, dtype=torch.float64)
        if counts.shape == (self.num_items,):
            counts = torch.cat([counts.new_zeros(1), counts])
        if counts.shape != (self.num_items + 1,):
            raise ValueError(
                f"counts must have shape ({self.num_items + 1},) or ({self.num_items},), got {tuple(counts.shape)}"
            )
        weights = counts.clamp_min(1.0)
        weights[0] = 0.0
        log_q = (weights / weights.sum()).log().to(torch.float32)
        self.sampling_log_q = log_q.to(self.sampling_log_q.device)
        self.sampling_is_uniform = False

    def _draw_shared_negatives(self, num_sampled: int) -> torch.Tensor:
        device = self.sampling_log_q.device
        if self.sampling_is_uniform:
            return torch.randint(1, self.num_items + 1, (num_sampled,), device=device)  # (K,)
        return torch.multinomial(self.sampling_log_q.exp(), num_sampled, replacement=True)  # (K,)

    def calculate_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weighted loss of a training batch and its unweighted terms.

        Args:
            batch: ``user_ids (B,)``, ``item_seq (B, T)`` right-padded with 0, ``targets (B, S)``
                aligned with the output positions (0 = no loss there).

        Returns:
            ``loss`` (weighted total, differentiable) and the detached unweighted terms
            ``cross_entropy``, ``context_bpr``, ``user_bpr``, ``l2`` (0 when switched off).
        """
        user_ids, item_seq, targets = batch["user_ids"], batch["item_seq"], batch["targets"]
        batch_size, seq_len = item_seq.shape
        expected = (batch_size, seq_len + (1 if self.use_user_token else 0))
        if tuple(targets.shape) != expected:
            raise ValueError(f"targets must have shape {expected} (B, S), got {tuple(targets.shape)}")
        if seq_len > self.max_seq_len:
            raise ValueError(f"item_seq has {seq_len} positions, more than model.max_seq_len={self.max_seq_len}")
        stage_a = self.config.stage_a
        weights = stage_a.loss_weights
        ce_config = stage_a.ce
        unknown_user_prob = self.config.model.unknown_user_prob
        if self.training and unknown_user_prob > 0:
            drop = torch.rand(user_ids.shape, device=user_ids.device) < unknown_user_prob  # (B,)
            user_ids = user_ids.masked_fill(drop, 0)

        reversed_rows = batch.get("reversed")
        if self.direction_embedding is not None and reversed_rows is None:
            reversed_rows = torch.zeros(batch_size, device=item_seq.device)  # keeps the vector in the graph (DDP)
        states = self(user_ids, item_seq, reversed_rows)  # (B, S, d)
        valid = targets != 0  # (B, S)
        query = self.scoring_states(states[valid].float())  # (N, d[+1])
        positives = targets[valid]  # (N,)
        position_users = user_ids[:, None].expand_as(targets)[valid]  # (N,)
        item_table = self.embeddings.item_embeddings
        zero = query.sum() * 0.0  # keeps the graph when a term is off or the batch is empty

        cross_entropy = zero
        if weights.collaborative > 0 and positives.numel() > 0:
            if ce_config.mode == "full":
                chunk = chunk_positions(self.num_items, ce_config.chunk_size, ce_config.chunk_memory_mb)
                soft_targets, soft_weights = positives, None
                if ce_config.future_weight > 0:
                    soft_targets, soft_weights = future_soft_targets(
                        targets, ce_config.future_targets, ce_config.future_weight
                    )  # (B, S, 1+F) each
                    soft_targets, soft_weights = soft_targets[valid], soft_weights[valid]  # (N, 1+F)
                elif ce_config.tied_targets and "target_groups" in batch:
                    tied_ids, tied_weights = tied_soft_targets(targets, batch["target_groups"])  # (B, S, M)
                    if tied_ids.shape[-1] > 1:  # a batch without ties keeps the plain targets
                        soft_targets, soft_weights = tied_ids[valid], tied_weights[valid]  # (N, M)
                cross_entropy = chunked_cross_entropy(
                    query, self.scoring_table(), soft_targets, chunk, ce_config.label_smoothing, soft_weights
                )
            else:
                negatives = self._draw_shared_negatives(ce_config.num_sampled)  # (K,)
                log_q_pos = log_q_neg = None
                if ce_config.logq_correction:
                    log_q_pos = self.sampling_log_q[positives]  # (N,)
                    log_q_neg = self.sampling_log_q[negatives]  # (K,)
                cross_entropy = sampled_softmax_cross_entropy(
                    query,
                    self._scoring_rows(positives).float(),  # (N, d[+1])
                    self._scoring_rows(negatives).float(),  # (K, d[+1])
                    positives,
                    negatives,
                    log_q_pos,
                    log_q_neg,
                )

        context_bpr = user_bpr = zero
        use_context = stage_a.collaborative.use_bpr_loss and weights.context_bpr_weight > 0
        use_user = stage_a.collaborative.use_bpr_loss and weights.user_bpr_weight > 0
        if (use_context or use_user) and positives.numel() > 0:
            negatives = sample_negatives(
                positives, self.num_items, stage_a.collaborative.negative_samples
            )  # (N, K)
            positive_rows = self._scoring_rows(positives).float()  # (N, d[+1])
            negative_rows = self._scoring_rows(negatives).float()  # (N, K, d[+1])
            if use_context:
                context_bpr = bpr_loss(query, positive_rows, negative_rows)
            if use_user:
                user_rows = self.scoring_states(self.embeddings.user_embeddings(position_users).float())  # (N, d[+1])
                user_bpr = bpr_loss(user_rows, positive_rows, negative_rows)

        contrastive = zero
        if weights.contrastive > 0 and self.training and positives.numel() > 0:
            contrastive = self._contrastive(batch, user_ids, item_seq, reversed_rows, states)

        l2 = zero
        regularization = weights.regularization * self.config.embeddings.lambda_c
        if regularization > 0:
            l2 = self.embeddings.user_embeddings.weight.float().pow(2).sum() + item_table.weight.float().pow(2).sum()

        loss = (
            weights.collaborative * cross_entropy
            + weights.context_bpr_weight * context_bpr
            + weights.user_bpr_weight * user_bpr
            + regularization * l2
            + weights.contrastive * contrastive
        )
        return {
            "loss": loss,
            "contrastive": contrastive.detach(),
            "cross_entropy": cross_entropy.detach(),
            "context_bpr": context_bpr.detach(),
            "user_bpr": user_bpr.detach(),
            "l2": l2.detach(),
        }

    def _last_input_states(self, states: torch.Tensor, item_seq: torch.Tensor) -> torch.Tensor:
        """``(B, S, d)`` -> ``(B, d)``: each row's state at its last input item (the user token
        for a row without items), the one that predicts the window's last target."""
        last = (item_seq != 0).sum(dim=1) - (0 if self.use_user_token else 1)  # (B,)
        return states[torch.arange(states.shape[0], device=states.device), last.clamp_min(0)]

    def _contrastive(self, batch, user_ids, item_seq, reversed_rows, states) -> torch.Tensor:
        """``stage_a.loss_weights.contrastive``'s term: the last state of each window against a
        second pass over its positive (``stage_a.contrastive_positive``): the same window with
        new dropout, or another user's prefix before the same target (``positive_seq``)."""
        if "positive_seq" in batch:
            positive_seq = batch["positive_seq"]  # (B, P)
            positive_reversed = batch.get("positive_reversed")
            if self.direction_embedding is not None and positive_reversed is None:
                positive_reversed = torch.zeros_like(reversed_rows)
            second = self(batch["positive_users"], positive_seq, positive_reversed)  # (B, P[+1], d)
        else:
            positive_seq = item_seq
            second = self(user_ids, item_seq, reversed_rows)  # (B, S, d): new dropout
        return info_nce(
            self._last_input_states(states, item_seq),
            self._last_input_states(second, positive_seq),
            self.config.stage_a.contrastive_temperature,
            cosine=self.config.stage_a.contrastive_similarity == "cosine",
        )

    # ---- checkpoints -----------------------------------------------------------------------

    def _token_embedding_keys(self) -> set[str]:
        stub = self.backbone.get_input_embeddings().weight
        return {f"backbone.{name}" for name, p in self.backbone.named_parameters() if p is stub} | {
            f"backbone.{name}" for name, p in self.backbone.state_dict(keep_vars=True).items() if p is stub
        }

    def _stored_backbone_key(self, key: str) -> bool:
        if self.finetune_mode == "full" or self.backbone_info.get("source") in ("random", "given"):
            # Changed weights, or random weights that nothing else can re-create.
            return True
        if self.finetune_mode == "lora":
            return "lora_" in key
        return False  # frozen pretrained: reloaded from base_llm

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must store, detached and contiguous (safetensors-ready).

        Always: the ID tables, their projections and ``out_proj``. Backbone: every weight in
        ``full`` mode, the adapter weights in ``lora`` mode, none when frozen; but a random-init
        backbone is stored whole in every mode, since no file can re-create it. The unused
        token-embedding stub is never stored.
        """
        skip = self._token_embedding_keys()
        state = {}
        for key, tensor in self.state_dict().items():
            if key in skip:
                continue
            if key.startswith("backbone.") and not self._stored_backbone_key(key):
                continue
            state[key] = tensor.detach().contiguous()
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`trainable_state_dict` stored; strict about keys and shapes.

        Raises:
            CheckpointError: missing or unexpected keys, or a shape that differs (e.g. a
                different catalogue or backbone).
        """
        expected = self.trainable_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
            raise CheckpointError(
                "checkpoint weights do not match the model built from its config: " + "; ".join(parts)
            )
        for key, tensor in state.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise CheckpointError(
                    f"checkpoint weight {key} has shape {tuple(tensor.shape)}, the model expects "
                    f"{tuple(expected[key].shape)} (different catalogue, users or backbone?)"
                )
        result = self.load_state_dict(state, strict=False)
        not_loaded = set(result.unexpected_keys)
        if not_loaded:  # pragma: no cover - guarded above
            raise CheckpointError(f"checkpoint weights not loaded: {sorted(not_loaded)[:3]}")


def build_model(config: Config, num_users: int, num_items: int) -> StageAModel:
    """Build a :class:`StageAModel` (backbone loaded and set to its fine-tuning mode).

    Args:
        config: the whole configuration.
        num_users: known users U.
        num_items: items I.
    """
    return StageAModel(config, num_users, num_items)


def count_parameters(model: StageAModel) -> dict[str, int]:
    """``total``, ``trainable`` and ``backbone_trainable`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    backbone_trainable = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "backbone_trainable": backbone_trainable}


__all__: list[Any] = [
    "StageAModel",
    "build_model",
    "count_parameters",
    "chunked_cross_entropy",
    "sampled_softmax_cross_entropy",
    "tied_soft_targets",
    "sample_negatives",
    "bpr_loss",
    "keep_recent",
    "chunk_positions",
]
