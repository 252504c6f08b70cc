"""Configuration: a typed dataclass tree, loaded from YAML, validated once, with overrides.

``load_config(path, overrides)`` is the one entry point. Every key of ``config/config.yaml``
is a field below; a mistyped key is an error naming the closest valid key, a wrong type or an
out-of-range value is an error naming the key and the fix (never a silent ``None``).

Overrides use dotted paths: ``--set stage_a.learning_rate=3e-4 --set data.k_core=1``; the
value is parsed as YAML (``true``, ``[1, 5]``, ``null`` work).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import ConfigError

CONFIG_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------


DATA_FORMATS = (
    "auto",
    "amazon_json",
    "amazon_ratings_csv",
    "amazon2023_csv",
    "amazon2023_jsonl",
    "csv",
    "movielens_udata",
    "movielens_dat",
    "movielens_csv",
    "sasrec_pairs",
    "sasrec_sequences",
)
"""Values of ``data.format`` (see ``data/readers.py``)."""


@dataclass
class DataColumns:
    """Column names in the raw file; ``null`` means: detect from the known formats."""

    user: Optional[str] = None
    """User id column (e.g. ``reviewerID``, ``user_id``, ``userId``)."""
    item: Optional[str] = None
    """Item id column (e.g. ``asin``, ``parent_asin``, ``movieId``)."""
    timestamp: Optional[str] = None
    """Time column (e.g. ``unixReviewTime``, ``timestamp``); a file without one is an error
    unless ``data.allow_no_timestamps`` (then file order is time order)."""
    rating: Optional[str] = None
    """Rating column, used only by ``data.min_rating``."""


@dataclass
class DataConfig:
    """Raw logs → processed dataset (``llmrec preprocess``)."""

    path: Optional[str] = None
    """Raw interaction file (any supported format, gzip or not). Required by preprocess."""
    format: str = "auto"
    """``auto`` or one of: amazon_json, amazon_ratings_csv, amazon2023_csv, amazon2023_jsonl,
    csv, movielens_udata, movielens_dat, movielens_csv, sasrec_pairs, sasrec_sequences."""
    columns: DataColumns = field(default_factory=DataColumns)
    """Column-name overrides for CSV/JSON inputs."""
    delimiter: Optional[str] = None
    """Field delimiter for ``csv``; ``null`` detects it."""
    timestamp_unit: str = "auto"
    """``auto``, ``s`` or ``ms``: unit of the time column (Amazon'23 uses milliseconds)."""
    min_rating: Optional[float] = None
    """Drop interactions with a rating below this (``null``: keep all)."""
    dedup: bool = True
    """Drop exact duplicate events (same user, item and time)."""
    k_core: int = 5
    """Iterative k-core: keep users and items with at least k interactions (1 disables)."""
    split: Literal["leave_one_out", "chronological"] = "leave_one_out"
    """``leave_one_out`` (last item test, second-to-last validation: SASRec's protocol, the
    default because the evaluation uses it) or ``chronological`` (global time split)."""
    split_ratios: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    """Train/validation/test fractions of events for ``split: chronological``."""
    min_user_interactions_for_eval: int = 3
    """Users with fewer events keep all of them in training and are not evaluated."""
    skip_bad_lines: bool = False
    """Count and skip malformed lines instead of stopping at the first one."""
    normalize_ids: bool = True
    """Unicode-normalise ids (NFC) and strip surrounding spaces; case is always kept."""
    allow_no_timestamps: bool = False
    """A CSV/JSON file with no time column: use file order as time order (true) or stop
    with an error naming the missing column (false, the default: a missing column is more
    often a mistake than a design)."""

    def __post_init__(self) -> None:
        if self.format not in DATA_FORMATS:
            close = difflib.get_close_matches(self.format, DATA_FORMATS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"data.format={self.format!r} must be one of {', '.join(DATA_FORMATS)}{hint}"
            )
        _check(
            self.delimiter is None or len(self.delimiter) == 1,
            "data.delimiter",
            self.delimiter,
            "must be one character or null (detect)",
        )
        _check(self.k_core >= 1, "data.k_core", self.k_core, "must be >= 1 (1 disables k-core)")
        _check(
            len(self.split_ratios) == 3
            and all(r >= 0 for r in self.split_ratios)
            and abs(sum(self.split_ratios) - 1.0) < 1e-6
            and self.split_ratios[0] > 0,
            "data.split_ratios",
            self.split_ratios,
            "must be three non-negative fractions (train, validation, test) summing to 1",
        )
        _check(
            self.timestamp_unit in ("auto", "s", "ms"),
            "data.timestamp_unit",
            self.timestamp_unit,
            "must be auto, s or ms",
        )
        _check(
            self.min_user_interactions_for_eval >= 3,
            "data.min_user_interactions_for_eval",
            self.min_user_interactions_for_eval,
            "must be >= 3 (one train, one validation and one test event)",
        )


@dataclass
class LoraSettings:
    """LoRA adapter settings (``model.finetune: lora``), passed to PEFT's ``LoraConfig``."""

    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """Scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: Optional[list[str]] = None
    """Module names to adapt; ``null`` picks the attention projections of the family."""

    def __post_init__(self) -> None:
        _check(self.r >= 1, "model.lora.r", self.r, "must be >= 1")
        _check(0.0 <= self.dropout < 1.0, "model.lora.dropout", self.dropout, "must be in [0, 1)")


@dataclass
class ItemKNNConfig:
    """Item co-occurrence neighbours fused with the model's scores (models/item_knn.py):
    ``score = logits + weight * knn``, knn summing the cosine co-occurrence of each candidate
    with the user's last ``history`` items."""

    enabled: bool = False
    """Build the neighbour table when training and fuse it into every score."""
    weight: Optional[float] = None
    """Fusion weight; ``null`` picks it on validation at the end of training from
    ``weight_grid`` (recorded in checkpoint.json)."""
    weight_grid: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0])
    """Candidate weights for ``weight: null``."""
    window: int = 10
    """Events apart in a user's sequence that still count as co-occurring."""
    direction: Literal["both", "forward", "auto"] = "both"
    """``both``: a history item votes for the items within ``window`` events of it in either
    order; ``forward``: only for those that came after it (on Beauty item-kNN alone scores
    0.0547 full NDCG@10 forward, 0.0460 both ways; on MovieLens-100k, whose rating sessions
    have little order, 0.1088 and 0.1189); ``auto``: tries both with every weight and keeps
    what validation prefers (recorded in checkpoint.json)."""
    history: int = 10
    """Most recent history items that vote for their neighbours."""
    decay: float = 0.8
    """Vote of the k-th most recent history item: decay**k."""
    scale: float = 10.0
    """Similarity is log1p(scale * cosine)."""
    max_neighbors: Optional[int] = None
    """Keep each item's most similar neighbours only (``null``: all; cap it on big catalogues,
    the table holds every co-occurring pair)."""

    def __post_init__(self) -> None:
        _check(self.weight is None or self.weight >= 0, "model.item_knn.weight", self.weight, "must be >= 0 or null")
        _check(
            len(self.weight_grid) >= 1 and all(w >= 0 for w in self.weight_grid),
            "model.item_knn.weight_grid",
            self.weight_grid,
            "must be a non-empty list of numbers >= 0",
        )
        _check(self.window >= 1, "model.item_knn.window", self.window, "must be >= 1")
        _check(self.history >= 1, "model.item_knn.history", self.history, "must be >= 1")
        _check(0 < self.decay <= 1, "model.item_knn.decay", self.decay, "must be in (0, 1]")
        _check(self.scale > 0, "model.item_knn.scale", self.scale, "must be > 0")
        _check(
            self.max_neighbors is None or self.max_neighbors >= 1,
            "model.item_knn.max_neighbors",
            self.max_neighbors,
            "must be >= 1 or null",
        )


@dataclass
class ModelConfig:
    """The Stage A model: ID tables, projections and the LLM backbone."""

    base_llm: str = "Qwen/Qwen2-0.5B"
    """Hugging Face hub name (offline from the cache), a local model folder, or a .gguf file."""
    embedding_dim: int = 128
    """Width d_rec of the user and item tables (the spec's embedding_dim)."""
    freeze_llm_stage_a: bool = False
    """The spec's switch: true keeps the backbone frozen, false fine-tunes it fully.
    ``model.finetune`` (when set) takes precedence."""
    random_init_stage_a_llm: bool = False
    """Build the backbone from its config with random weights (no weights needed)."""
    finetune: Optional[Literal["full", "frozen", "lora"]] = None
    """``full``, ``frozen`` or ``lora``; ``null`` follows freeze_llm_stage_a."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings, used when finetune is ``lora``."""
    num_layers: Optional[int] = None
    """Keep only the first k transformer layers (pretrained) or build k layers (random)."""
    hidden_size: Optional[int] = None
    """Random init only: backbone width (``null``: the architecture's own)."""
    num_heads: Optional[int] = None
    """Random init only: attention heads (``null``: the architecture's own, or width/64)."""
    intermediate_size: Optional[int] = None
    """Random init only: MLP width (``null``: 4 × hidden_size)."""
    dropout: Optional[float] = None
    """Dropout inside the backbone (``null``: the architecture's own; pretrained GPT-2: 0.1)."""
    residual_dropout: Optional[float] = None
    """Dropout on each sublayer's output before it joins the residual stream (GPT-2's
    ``resid_pdrop``; ``null``: ``model.dropout``). SASRec drops the FFN's output but not the
    attention's; GPT-2 drops both with one rate. Only families with such a setting."""
    mlp_dropout: Optional[float] = None
    """Dropout on the MLP's hidden activation in every decoder layer (``null``/0: none), as
    SASRec's point-wise feed-forward drops after its ReLU; GPT-2, Qwen2 and Llama have no such
    setting, so it wraps the layer's activation (``mlp.act`` / ``mlp.act_fn``)."""
    initializer_range: Optional[float] = None
    """Random init only: std of the backbone's normal weight init (``null``: the
    architecture's own, 0.02 for GPT-2, Qwen2 and Llama)."""
    position_init_std: Optional[float] = None
    """Random init only: std of the normal init of the backbone's learned position table
    (GPT-2's ``wpe``; ``null``: ``initializer_range``). SASRec's xavier-initialised positions
    are as loud as its sqrt(d)-scaled items; GPT-2's 0.02 rows are a tenth of a soft token at
    ``soft_token_scale`` sqrt(d). Families with rotary positions have no table to set."""
    activation: Optional[str] = None
    """Random init only: the MLP activation (``gelu_new``, ``gelu``, ``relu``, ``silu``, ...;
    ``null``: the architecture's own)."""
    attention_kv: Literal["normalised", "stream"] = "normalised"
    """What each layer's attention reads its keys and values from: ``normalised`` (GPT-2,
    Llama, Qwen2: ``norm(h)``, as the queries) or ``stream`` (SASRec: queries from ``norm(h)``,
    keys and values from the un-normalised ``h``). Same weights and names either way."""
    mlp_residual: Literal["stream", "normalised"] = "stream"
    """What each layer's MLP output is added to: ``stream`` (GPT-2, Llama, Qwen2: the residual
    stream, ``h + mlp(norm(h))``) or ``normalised`` (SASRec's point-wise feed-forward:
    ``norm(h) + mlp(norm(h))``, so every layer hands on a re-normalised stream). Same weights
    and names either way."""
    soft_token_scale: float = 1.0
    """Fixed multiplier of the projected soft tokens (SASRec multiplies its item embeddings by
    sqrt(d)): how loudly an item's identity speaks next to the position embeddings."""
    projection_init: Literal["default", "orthogonal"] = "default"
    """Init of the projections around the backbone (``item_proj``, ``user_proj``, ``out_proj``):
    ``default`` is torch's Linear init with a random bias; ``orthogonal`` keeps the ID
    vectors' geometry (norms and angles) through the projections, biases 0."""
    freeze_projections: bool = False
    """Keep ``item_proj``, ``user_proj`` and ``out_proj`` at their init: the ID tables alone
    learn the item and user representations (with ``projection_init: orthogonal`` and
    ``embedding_dim`` = the backbone width, SASRec's single item table, rotated)."""
    tie_output_projection: bool = False
    """Score with the input projection's transpose instead of a separate ``out_proj``: the
    state is compared with each item's projected row (without the token scale and the shared bias,
    which shift every score alike), as SASRec scores with the embedding it reads. The
    item's representation on the way in and the way out is then one and the same."""
    direction_token: bool = False
    """With ``stage_a.window_reversal_prob``: a learned vector added to every input token of a
    window read in reverse, so the network knows which way it reads. The item table still
    learns what comes before an item from the reversed windows, while the forward reading,
    the only one evaluated and served (where the vector is never added), keeps its own
    order. Starts at zero; without reversed windows it stays there."""
    item_bias: bool = False
    """A learned score offset per item, added to the dot product of the state and the item's
    row (``h . e_i + b_i``) in the losses, in evaluation and in serving: an item's overall
    popularity then has a place of its own instead of a direction every state must keep.
    No weight decay, no L2; its start is ``model.item_bias_init``."""
    item_bias_init: Literal["zero", "log_popularity"] = "zero"
    """Start of ``model.item_bias``: ``zero``, or ``log_popularity``: the log of each item's
    training count plus one, centred (the scores of a model that knows nothing else). Adam
    moves a bias about one learning rate per step, so from zero a few thousand steps span
    only a few nats of popularity."""
    embedding_dropout: float = 0.0
    """Dropout on the soft-token embeddings before the backbone."""
    max_seq_len: int = 50
    """Most recent items fed to the model (SASRec: 50 on Amazon, 200 on MovieLens)."""
    position_anchor: Literal["start", "end"] = "start"
    """Position ids count from the first visible token (``start``, as a language model reads)
    or are shifted so the most recent token always has the same position (``end``, as
    SASRec's left-padded positions do). Only absolute-position backbones (GPT-2) see a
    difference; rotary ones (Llama, Qwen2) are shift-invariant."""
    attend_padding: bool = False
    """SASRec's window: left-pad every sequence to exactly ``max_seq_len`` slots and let
    attention see the padding slots (the padding token). The last item then always sits at the
    last position, and a short history leaves many identical slots attention can rest on
    instead of mixing items it does not need (a weight that grows with the number of missing
    items). Costs a full ``max_seq_len`` window per sequence."""
    use_user_token: bool = True
    """Prepend the user soft token ``[user, item_1, ..., item_T]``; false feeds items only."""
    share_user_token: bool = False
    """With ``use_user_token``: every user gets the same learned token (the unknown-user row),
    a start-of-sequence token that attention can rest on instead of mixing history items it
    does not need; the user BPR term still trains each user's own row."""
    unknown_user_prob: float = 0.0
    """Training: probability of replacing a user with the learned unknown-user row (index 0),
    which is what cold users (a history, no id) get at inference."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype of the backbone (fp32 on CPU: bf16 is 6-50x slower there)."""
    attn_implementation: Optional[str] = "sdpa"
    """Attention kernel passed to transformers (``sdpa``, ``eager``, ``flash_attention_2``)."""
    trust_remote_code: bool = False
    """Allow a model folder to run its own Python code. Off unless you trust the source."""
    gguf_file: Optional[str] = None
    """File name inside ``base_llm`` folder when it holds a GGUF file (or give the .gguf path)."""
    item_knn: ItemKNNConfig = field(default_factory=ItemKNNConfig)
    """Item co-occurrence neighbours fused with the scores (off by default)."""

    def __post_init__(self) -> None:
        _check(self.embedding_dim >= 1, "model.embedding_dim", self.embedding_dim, "must be >= 1")
        _check(self.max_seq_len >= 1, "model.max_seq_len", self.max_seq_len, "must be >= 1")
        _check(
            self.num_layers is None or self.num_layers >= 1,
            "model.num_layers",
            self.num_layers,
            "must be >= 1 or null",
        )
        for key in ("hidden_size", "num_heads", "intermediate_size"):
            value = getattr(self, key)
            _check(value is None or value >= 1, f"model.{key}", value, "must be >= 1 or null")
        if self.hidden_size is not None and self.num_heads is not None:
            _check(
                self.hidden_size % self.num_heads == 0,
                "model.num_heads",
                self.num_heads,
                f"must divide model.hidden_size={self.hidden_size}",
            )
        for key in ("initializer_range", "position_init_std"):
            value = getattr(self, key)
            _check(value is None or value > 0, f"model.{key}", value, "must be > 0 or null")
        _check(self.soft_token_scale > 0, "model.soft_token_scale", self.soft_token_scale, "must be > 0")
        _check(
            self.item_bias or self.item_bias_init == "zero",
            "model.item_bias_init",
            self.item_bias_init,
            "needs model.item_bias: true",
        )
        for key in ("dropout", "residual_dropout", "mlp_dropout", "embedding_dropout", "unknown_user_prob"):
            value = getattr(self, key)
            _check(value is None or 0.0 <= value < 1.0, f"model.{key}", value, "must be in [0, 1)")
        if self.finetune is not None and self.finetune != "lora":
            # Keep the spec's key and the new one consistent so that either can be read.
            self.freeze_llm_stage_a = self.finetune == "frozen"

    @property
    def finetune_mode(self) -> str:
        """The effective mode: ``full``, ``frozen`` or ``lora``."""
        if self.finetune is not None:
            return self.finetune
        return "frozen" if self.freeze_llm_stage_a else "full"


@dataclass
class EmbeddingsConfig:
    """The user and item ID tables."""

    lambda_c: float = 0.001
    """The spec's collaborative embedding regularisation: ``L_reg = lambda_c * (||E_user||^2 +
    ||E_item||^2)``, squared Frobenius norms of the whole tables, added to the loss with weight
    ``stage_a.loss_weights.regularization``."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of both tables."""
    sparse: bool = False
    """Sparse gradients + SparseAdam for the tables (large catalogues: 30-45x cheaper steps)."""

    def __post_init__(self) -> None:
        _check(self.lambda_c >= 0, "embeddings.lambda_c", self.lambda_c, "must be >= 0")
        _check(self.init_std > 0, "embeddings.init_std", self.init_std, "must be > 0")


@dataclass
class LossWeights:
    """Weights of the Stage A loss terms (0 disables a term). The spec names three:

    ``loss = collaborative * L_ce + cf_bpr * (L_bpr_context + L_bpr_user)
    + regularization * lambda_c * (||E_user||^2 + ||E_item||^2)``.

    ``context_bpr`` and ``user_bpr`` extend the spec's ``cf_bpr``: relative weights of the two
    BPR terms inside it, so the context term's weight is ``cf_bpr * context_bpr`` (``null`` =
    1: the spec's sum). ``cf_bpr: 0`` with a positive relative weight is a contradiction and
    an error.
    """

    collaborative: float = 1.0
    """Next-item cross-entropy at every non-padding position (the spec's name; the older
    ``cross_entropy`` is an alias)."""
    cf_bpr: float = 1.0
    """Weight of ``L_bpr = L_bpr_context + L_bpr_user`` (both BPR terms)."""
    context_bpr: Optional[float] = None
    """Relative weight of the context BPR term inside ``cf_bpr`` (``null``: 1)."""
    user_bpr: Optional[float] = None
    """Relative weight of the user BPR term inside ``cf_bpr`` (``null``: 1)."""
    regularization: float = 0.0
    """Weight of ``L_reg = embeddings.lambda_c * (||E_user||^2 + ||E_item||^2)``."""
    contrastive: float = 0.0
    """Weight of a contrastive regulariser (DuoRec's; 0: off): the state that predicts each
    training window's last target is pulled towards a second pass over its positive
    (``stage_a.contrastive_positive``) against the batch's other windows (InfoNCE with
    ``stage_a.contrastive_similarity`` over ``stage_a.contrastive_temperature``). One more
    forward and backward pass."""

    def __post_init__(self) -> None:
        for key in ("collaborative", "cf_bpr", "context_bpr", "user_bpr", "regularization", "contrastive"):
            value = getattr(self, key)
            _check(value is None or value >= 0, f"stage_a.loss_weights.{key}", value, "must be >= 0")
        if self.cf_bpr == 0:
            for key in ("context_bpr", "user_bpr"):
                value = getattr(self, key)
                if value is not None and value > 0:
                    raise ConfigError(
                        f"stage_a.loss_weights.cf_bpr=0 switches L_bpr off, but stage_a.loss_weights.{key}="
                        f"{value!r} weights a term inside it (its weight is cf_bpr * {key}): set cf_bpr > 0, "
                        f"or {key}: null"
                    )

    @property
    def context_bpr_weight(self) -> float:
        """The context BPR term's weight in the total: ``cf_bpr * context_bpr``."""
        return self.cf_bpr * (1.0 if self.context_bpr is None else self.context_bpr)

    @property
    def user_bpr_weight(self) -> float:
        """The user BPR term's weight in the total: ``cf_bpr * user_bpr``."""
        return self.cf_bpr * (1.0 if self.user_bpr is None else self.user_bpr)


@dataclass
class CollaborativeConfig:
    """Negative sampling for the BPR terms."""

    negative_samples: int = 30
    """Negatives per positive for the BPR terms (never equal to the positive)."""
    use_bpr_loss: bool = True
    """Turn both BPR terms on or off (their weights stay in loss_weights)."""

    def __post_init__(self) -> None:
        _check(
            self.negative_samples >= 1,
            "stage_a.collaborative.negative_samples",
            self.negative_samples,
            "must be >= 1",
        )


@dataclass
class CrossEntropyConfig:
    """How the next-item cross-entropy is computed over the catalogue."""

    mode: Literal["full", "sampled"] = "full"
    """``full``: exact softmax over all items, chunked to ``chunk_size`` positions at a time.
    ``sampled``: softmax over the positive and ``num_sampled`` shared negatives drawn from
    the item popularity, with log-Q correction (cheap for 349K items, slightly biased)."""
    chunk_size: int = 4096
    """Positions scored at once in ``full`` mode; bounds memory at chunk_size x num_items."""
    chunk_memory_mb: float = 1024.0
    """Memory budget (MiB) of one chunk's fp32 logits and their softmax in ``full`` mode:
    chunk_size is lowered to fit, e.g. to ~380 positions at 349K items."""
    num_sampled: int = 1024
    """Shared negatives per batch in ``sampled`` mode."""
    proposal: Literal["popularity", "uniform"] = "popularity"
    """Distribution the ``sampled`` mode draws negatives from: ``popularity`` (training counts)
    approximates the full softmax with log-Q; ``uniform`` trains the positive against random
    items, which is what the sampled 1+100 protocol measures."""
    logq_correction: bool = True
    """Subtract log of the sampling probability from sampled logits (unbiased softmax)."""
    label_smoothing: float = 0.0
    """Label smoothing of the full cross-entropy."""
    future_targets: int = 0
    """Later items of the training window that share each position's target (full mode): the
    position's target distribution puts ``future_weight`` on the next ``future_targets`` items
    after its own target (split evenly among those the window has) and the rest on the target.
    0 = the plain next item. A model of "what comes soon", for data whose order within a
    short span is noisy (reviews of the same day)."""
    future_weight: float = 0.0
    """Target mass on the ``future_targets`` later items (0 <= w < 1)."""
    tied_targets: bool = False
    """Full mode: a target that shares its timestamp with later events of its training window
    shares its mass evenly with them. The data does not know the order of such a run, so the
    next event is any of the run's remaining ones: the expected loss of
    ``stage_a.shuffle_tied_events``' random order, without the noise of one draw. No effect on
    data without ties."""

    def __post_init__(self) -> None:
        _check(self.chunk_size >= 1, "stage_a.ce.chunk_size", self.chunk_size, "must be >= 1")
        _check(
            self.chunk_memory_mb > 0, "stage_a.ce.chunk_memory_mb", self.chunk_memory_mb, "must be > 0"
        )
        _check(self.num_sampled >= 1, "stage_a.ce.num_sampled", self.num_sampled, "must be >= 1")
        _check(
            0.0 <= self.label_smoothing < 1.0,
            "stage_a.ce.label_smoothing",
            self.label_smoothing,
            "must be in [0, 1)",
        )
        _check(self.future_targets >= 0, "stage_a.ce.future_targets", self.future_targets, "must be >= 0")
        _check(
            0.0 <= self.future_weight < 1.0, "stage_a.ce.future_weight", self.future_weight, "must be in [0, 1)"
        )
        _check(
            self.future_weight == 0 or (self.future_targets > 0 and self.mode == "full"),
            "stage_a.ce.future_weight",
            self.future_weight,
            "needs stage_a.ce.future_targets >= 1 and stage_a.ce.mode: full",
        )
        _check(
            not self.tied_targets or (self.mode == "full" and self.future_weight == 0),
            "stage_a.ce.tied_targets",
            self.tied_targets,
            "needs stage_a.ce.mode: full and no stage_a.ce.future_weight",
        )


@dataclass
class StageAConfig:
    """Stage A training (``llmrec train``)."""

    batch_size: int = 32
    """Sequences per optimizer micro-batch (per process)."""
    learning_rate: float = 5.0e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.001
    """AdamW weight decay, on matrices only (not norms, biases or the ID tables)."""
    embedding_weight_decay: float = 0.0
    """AdamW weight decay on the ID tables (lambda_c is the spec's regulariser)."""
    epochs: int = 10
    """Maximum number of epochs (the spec's name; the older ``num_epochs`` is an alias)."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (``null``: run epochs)."""
    max_train_minutes: Optional[float] = None
    """Wall-clock budget: stop (after validating) once it is used up."""
    warmup_ratio: float = 0.02
    """Fraction of the total steps spent in linear warmup."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (cosine and linear)."""
    lr_decay_patience: int = 0
    """Multiply the learning rate by ``lr_decay_factor`` each time validation NDCG@10 has not
    improved for this many validations (0: never). It adapts the decay to how fast a data
    set converges, where a schedule over ``epochs`` would need the right epoch count."""
    lr_decay_factor: float = 0.1
    """Factor of each plateau decay (``lr_decay_patience``)."""
    ema_decay: Optional[float] = None
    """Keep an exponential moving average of the weights, updated after every optimizer
    step, and validate, select and save it instead of the raw weights (``null``: off).
    The decay at step t is ``min(ema_decay, (1 + t) / (10 + t))``, so early averages do not
    drag in the random init. It smooths the noise of a constant learning rate."""
    max_grad_norm: Optional[float] = 1.0
    """Gradient clipping (``null`` disables)."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW's (beta1, beta2)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    seed: int = 42
    """Seed of initialisation, data order and negative sampling."""
    patience: int = 3
    """Early stopping: validations without a better NDCG@10 before stopping (0 disables)."""
    eval_every_epochs: int = 1
    """Validate every this many epochs."""
    eval_min_steps: int = 0
    """Validate no more often than every this many optimizer steps: the validation cadence is
    ``eval_every_epochs`` rounded up to a multiple that spans at least this many steps, and
    ``patience`` counts those validations. On a small data set (one or two steps per epoch) a
    cadence in epochs alone would end the run after a few dozen steps; in steps it gives every
    data set the same number of updates between validations (0: epochs alone)."""
    eval_protocol: Literal["sampled", "full"] = "sampled"
    """Protocol of the validation metric used for early stopping."""
    eval_max_users: Optional[int] = None
    """Validate on a seeded sample of users (``null``: all); the test is always on all."""
    eval_deletion_readings: Optional[int] = None
    """``evaluation.deletion_readings`` of every validation training does: the one that picks
    the best epoch and stops the run, the neighbour weight of ``validated_model`` and the gate
    of ``window_reversal: weak_order`` (``null``: the evaluation's own). Each reading is one
    more forward pass, so the readings multiply every validation's cost (Beauty: 3 s -> ~100 s
    at 32; a neighbour weight grid of 9 weights in 2 directions, 18 of them) while they raise
    every epoch's score by about the same amount and so hardly move which epoch is best; 0
    validates on the plain reading and leaves the readings to ``llmrec evaluate`` and
    serving."""
    eval_item_readings: Optional[int] = None
    """``evaluation.item_readings`` of every validation training does (the same validations as
    ``eval_deletion_readings``; ``null``: the evaluation's own; 0: each history alone)."""
    windows_per_user: Optional[int] = 1
    """Training windows per user per epoch: the most recent one, then earlier, non-overlapping
    ones of ``model.max_seq_len + 1`` events. ``null``: all of them, so every training event is
    a target once per epoch (long histories, e.g. MovieLens with ~100 events per user, are
    otherwise trained on their last 51 events only)."""
    shuffle_tied_events: bool = False
    """Give a user's training events that share one timestamp a new random order every epoch
    instead of the order of the input file (which is all the data says about them). Logs
    with coarse timestamps have many: MovieLens-100k records 51% of its events in the same
    second as the previous one, Amazon reviews carry a date. No effect on data without ties
    (Beauty's sequence file); validation and test events never move."""
    item_deletion_prob: float = 0.0
    """Data augmentation: each training event of a window but its last is deleted with this
    probability, anew every epoch, and the rest close up (a shorter history in the same
    order). Validation and test histories are never touched."""
    item_substitution_prob: float = 0.0
    """Data augmentation: each input item of a training window is replaced with this
    probability by an item drawn uniformly from the catalogue, anew every epoch; the targets
    stay the true events (a denoising task: predict the next real item from a noisy
    history). Applied after ``item_deletion_prob``. Validation and test histories are never
    touched."""
    window_reversal_prob: float = 0.0
    """Data augmentation: each training window is read in reverse order with this
    probability, anew every epoch (after ``item_deletion_prob``): the network also learns
    which items come *before* a history item. Item-kNN counts co-occurrence in both orders,
    and on logs whose order is weak (MovieLens rating sessions) that is what it leads the
    network by. Validation and test histories are never touched."""
    contrastive_temperature: float = 1.0
    """Temperature of the contrastive term (``stage_a.loss_weights.contrastive``); DuoRec's 1."""
    contrastive_similarity: Literal["dot", "cosine"] = "dot"
    """The contrastive term's similarity: DuoRec's dot product, or the cosine (the states
    L2-normalised first, so the logits stay within +-1/temperature whatever the states' norm:
    trained networks' states have norms of 10-30, and a dot product over temperature 1
    saturates the softmax)."""
    contrastive_positive: Literal["dropout", "same_target"] = "dropout"
    """The contrastive term's positive for a window's last state: ``dropout``, the same window
    with new dropout (DuoRec's unsupervised term); ``same_target``, another user's training
    prefix that ends just before an event of the same item (DuoRec's supervised term; a window
    whose item no other user has falls back to ``dropout``)."""
    window_reversal: Literal["always", "weak_order"] = "always"
    """When ``window_reversal_prob`` applies: ``always``, or ``weak_order``: only on data whose
    order says little, where item-kNN of the training events scores higher on validation (full
    NDCG@10) counting co-occurrence in both orders than forward only. Both are measured before
    training (seconds; the same for the refit) and printed. MovieLens' rating sessions pass,
    Amazon Beauty and Wikipedia (whose order carries the signal) do not."""
    last_batch: Literal["drop", "fill"] = "drop"
    """The epoch's last, partial batch: ``drop`` skips those examples (a different remainder
    every epoch); ``fill`` completes the batch with examples from the start of the epoch's
    shuffled order, so every example is trained on every epoch (a few twice). Small data
    sets need ``fill``: with 943 users and batch 512, ``drop`` skips 46% of them each epoch."""
    length_bucketing: bool = True
    """Group windows of similar length into batches (order still shuffled per epoch): with
    short Amazon sequences most of a randomly formed batch is padding."""
    loss_average: Literal["batch", "epoch"] = "batch"
    """``batch``: each step's loss is the mean over its batch's target positions, so a
    position in a batch of short windows weighs more than one in a batch of long windows
    (length bucketing makes them differ by 10x on Amazon data). ``epoch``: each step's loss is
    its sum over positions divided by the epoch's average positions per batch: every target
    position weighs the same, as in randomly formed batches."""
    loss_weights: LossWeights = field(default_factory=LossWeights)
    """Weights of the loss terms."""
    collaborative: CollaborativeConfig = field(default_factory=CollaborativeConfig)
    """Negative sampling for the BPR terms."""
    ce: CrossEntropyConfig = field(default_factory=CrossEntropyConfig)
    """How the cross-entropy is computed."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """``auto``: bf16 on CUDA, fp32 on CPU."""
    num_workers: int = 0
    """DataLoader worker processes."""
    log_every_steps: int = 50
    """Progress-bar and metrics.jsonl update interval."""
    compile: bool = False
    """torch.compile the backbone (no CPU speed-up measured; try on GPU)."""
    refit_on_valid: bool = False
    """After early stopping picked the best epoch E on validation, train again from scratch
    on training + validation events for E epochs (same seed and schedule) and make that
    ``best_model/``; the validation-selected model is kept as ``validated_model/``. The
    refit model has seen the validation events: evaluate it on the test split."""

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "stage_a.batch_size", self.batch_size, "must be >= 1")
        _check(
            self.learning_rate > 0, "stage_a.learning_rate", self.learning_rate, "must be > 0"
        )
        _check(self.weight_decay >= 0, "stage_a.weight_decay", self.weight_decay, "must be >= 0")
        _check(
            self.embedding_weight_decay >= 0,
            "stage_a.embedding_weight_decay",
            self.embedding_weight_decay,
            "must be >= 0",
        )
        _check(self.epochs >= 1, "stage_a.epochs", self.epochs, "must be >= 1")
        _check(
            self.max_steps is None or self.max_steps >= 1,
            "stage_a.max_steps",
            self.max_steps,
            "must be >= 1 or null",
        )
        _check(
            self.max_train_minutes is None or self.max_train_minutes > 0,
            "stage_a.max_train_minutes",
            self.max_train_minutes,
            "must be > 0 or null",
        )
        _check(0 <= self.warmup_ratio < 1, "stage_a.warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        _check(
            0 <= self.item_deletion_prob < 1, "stage_a.item_deletion_prob", self.item_deletion_prob, "must be in [0, 1)"
        )
        _check(
            0 <= self.item_substitution_prob < 1,
            "stage_a.item_substitution_prob",
            self.item_substitution_prob,
            "must be in [0, 1)",
        )
        _check(
            0 <= self.window_reversal_prob <= 1,
            "stage_a.window_reversal_prob",
            self.window_reversal_prob,
            "must be in [0, 1]",
        )
        _check(
            self.contrastive_temperature > 0,
            "stage_a.contrastive_temperature",
            self.contrastive_temperature,
            "must be > 0",
        )
        _check(0 <= self.min_lr_ratio <= 1, "stage_a.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _check(self.lr_decay_patience >= 0, "stage_a.lr_decay_patience", self.lr_decay_patience, "must be >= 0")
        _check(0 < self.lr_decay_factor < 1, "stage_a.lr_decay_factor", self.lr_decay_factor, "must be in (0, 1)")
        _check(
            self.ema_decay is None or 0 < self.ema_decay < 1, "stage_a.ema_decay", self.ema_decay, "must be in (0, 1)"
        )
        _check(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "stage_a.max_grad_norm",
            self.max_grad_norm,
            "must be > 0 or null",
        )
        _check(
            len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
            "stage_a.adam_betas",
            self.adam_betas,
            "must be two numbers in [0, 1), e.g. [0.9, 0.999]",
        )
        _check(
            self.gradient_accumulation_steps >= 1,
            "stage_a.gradient_accumulation_steps",
            self.gradient_accumulation_steps,
            "must be >= 1",
        )
        _check(self.patience >= 0, "stage_a.patience", self.patience, "must be >= 0")
        _check(
            self.eval_every_epochs >= 1,
            "stage_a.eval_every_epochs",
            self.eval_every_epochs,
            "must be >= 1",
        )
        _check(self.eval_min_steps >= 0, "stage_a.eval_min_steps", self.eval_min_steps, "must be >= 0")
        _check(
            self.eval_max_users is None or self.eval_max_users >= 1,
            "stage_a.eval_max_users",
            self.eval_max_users,
            "must be >= 1 or null",
        )
        _check(
            self.eval_deletion_readings is None or self.eval_deletion_readings >= 0,
            "stage_a.eval_deletion_readings",
            self.eval_deletion_readings,
            "must be >= 0 or null (evaluation.deletion_readings)",
        )
        _check(
            self.eval_item_readings is None or self.eval_item_readings >= 0,
            "stage_a.eval_item_readings",
            self.eval_item_readings,
            "must be >= 0 or null (evaluation.item_readings)",
        )
        _check(
            self.windows_per_user is None or self.windows_per_user >= 1,
            "stage_a.windows_per_user",
            self.windows_per_user,
            "must be >= 1 or null (all windows)",
        )
        _check(self.num_workers >= 0, "stage_a.num_workers", self.num_workers, "must be >= 0")
        _check(
            self.log_every_steps >= 1, "stage_a.log_every_steps", self.log_every_steps, "must be >= 1"
        )


@dataclass
class EvaluationConfig:
    """Evaluation (``llmrec evaluate``, validation during training)."""

    num_negatives: int = 100
    """Sampled protocol: negatives per user (SASRec: 100)."""
    negative_sampling: Literal["uniform", "popularity"] = "uniform"
    """How sampled negatives are drawn from the items the user never interacted with."""
    ks: list[int] = field(default_factory=lambda: [1, 5, 10, 20])
    """Cut-offs for Hit@K and NDCG@K."""
    full_ranking: bool = True
    """Also rank the target among all items (items in the user's input masked)."""
    seed: int = 2024
    """Seed of the negative candidates (same seed, same candidates for every model)."""
    batch_size: int = 256
    """Users scored at once."""
    split: Literal["valid", "test"] = "test"
    """Split evaluated by ``llmrec evaluate`` / ``scripts/predict.py``."""
    tied_orders: int = 1
    """Orders of a history's same-timestamp events the model's scores are averaged over. A
    user's events with one timestamp (MovieLens rates many films in one second) have no true
    order, but the network reads them in one; with ``n > 1`` every evaluated history is also
    read in ``n - 1`` random orders of its tied groups (seeded by ``seed``; only the history's
    own timestamps are used, never the target's) and the scores are averaged. 1: the file's
    order only. No effect on data without ties."""
    deletion_readings: int = 0
    """Further readings of every history the scores are averaged over, each with every event
    deleted with probability ``deletion_prob`` (the rest closing up, the most recent kept when
    all would go): the inference side of ``stage_a.item_deletion_prob``, whose network learned
    from such histories. Reading ``k`` takes the ``k``-th tied order (cyclically) and deletes
    by a seeded draw of ``(seed, k, distance from the end of the history)``, so a history gets
    the same readings in evaluation, ``recommend``, ``serve`` and ``export-embeddings``. Each
    reading costs one more forward pass (and passes through the item neighbours as well).
    0: off."""
    deletion_prob: float = 0.2
    """Deletion probability of ``deletion_readings`` (the recipes: their item_deletion_prob)."""
    reading_average: Literal["scores", "probabilities"] = "scores"
    """How the readings (``tied_orders``, ``deletion_readings``) are averaged: their scores, or
    their predicted distributions over the items (each reading's softmax; the log of the mean
    is the score): the mixture of the readings' predictions. ``probabilities`` scores the
    sampled protocol from every item's score, and has no single query vector per user, so
    ``export-embeddings`` refuses it when there is more than one reading."""
    item_readings: int = 0
    """The last ``k`` items of every history read alone, each as a one-item history, besides
    the history itself: the user's state (the query vector) is ``1 - item_readings_weight``
    times the history's plus ``item_readings_weight`` times the mean of the ``k`` one-item
    states, so every recent item also votes on its own for what follows it (the network
    predicts from one item at the first position of every training window). Every reading of
    ``tied_orders`` and ``deletion_readings`` mixes in its own last ``k`` items. Each costs a
    forward pass of one token per row. The network's own readings: item neighbours
    (``model.item_knn``) and baselines are scored as they are. 0: off."""
    item_readings_weight: float = 0.33
    """Weight of the ``item_readings`` in the query vector, in (0, 1]."""

    def __post_init__(self) -> None:
        _check(
            self.num_negatives >= 1, "evaluation.num_negatives", self.num_negatives, "must be >= 1"
        )
        _check(self.item_readings >= 0, "evaluation.item_readings", self.item_readings, "must be >= 0")
        _check(
            0 < self.item_readings_weight <= 1,
            "evaluation.item_readings_weight",
            self.item_readings_weight,
            "must be in (0, 1]",
        )
        _check(
            len(self.ks) >= 1 and all(isinstance(k, int) and k >= 1 for k in self.ks),
            "evaluation.ks",
            self.ks,
            "must be a non-empty list of positive integers",
        )
        _check(self.batch_size >= 1, "evaluation.batch_size", self.batch_size, "must be >= 1")
        _check(self.tied_orders >= 1, "evaluation.tied_orders", self.tied_orders, "must be >= 1")
        _check(
            self.deletion_readings >= 0, "evaluation.deletion_readings", self.deletion_readings, "must be >= 0"
        )
        _check(0 < self.deletion_prob < 1, "evaluation.deletion_prob", self.deletion_prob, "must be in (0, 1)")
        _check(
            self.reading_average in ("scores", "probabilities"),
            "evaluation.reading_average",
            self.reading_average,
            "must be 'scores' or 'probabilities'",
        )


@dataclass
class ServingConfig:
    """Top-K recommendation and the HTTP service."""

    default_k: int = 10
    """K when a request does not give one."""
    max_k: int = 1000
    """Largest K a request may ask for (larger: HTTP 422)."""
    max_history: int = 1000
    """Longest history a request may send (longer: HTTP 422); the model reads the last max_seq_len."""
    max_batch_users: int = 1024
    """Most users in one /recommend/batch request."""
    max_body_bytes: int = 1_000_000
    """Largest request body accepted (larger: HTTP 413)."""
    unknown_items: Literal["ignore", "error"] = "ignore"
    """Unknown item ids in a history: ``ignore`` (dropped, listed in the response) or ``error`` (404)."""
    batch_window_ms: float = 2.0
    """How long the service waits to gather concurrent requests into one forward pass."""

    def __post_init__(self) -> None:
        _check(self.default_k >= 1, "serving.default_k", self.default_k, "must be >= 1")
        _check(self.max_k >= self.default_k, "serving.max_k", self.max_k, "must be >= serving.default_k")
        _check(self.max_history >= 1, "serving.max_history", self.max_history, "must be >= 1")
        _check(self.max_batch_users >= 1, "serving.max_batch_users", self.max_batch_users, "must be >= 1")
        _check(self.max_body_bytes >= 1024, "serving.max_body_bytes", self.max_body_bytes, "must be >= 1024")
        _check(self.batch_window_ms >= 0, "serving.batch_window_ms", self.batch_window_ms, "must be >= 0")


@dataclass
class RuntimeConfig:
    """Where and how things run."""

    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    num_threads: Optional[int] = None
    """torch CPU threads (``null``: torch's default). 1 is often faster on a busy machine."""
    deterministic: bool = True
    """Deterministic algorithms where torch offers them (CPU runs repeat bit for bit)."""
    fsdp: bool = False
    """Multi-process runs: shard parameters, gradients and optimizer state across processes
    (PyTorch FSDP2, one unit per decoder layer) instead of replicating them (DDP). For full
    fine-tuning of backbones too large for one device. Launch with ``accelerate launch
    --multi_gpu`` or ``torchrun`` as for DDP; ignored in a single process."""

    def __post_init__(self) -> None:
        _check(
            self.num_threads is None or self.num_threads >= 1,
            "runtime.num_threads",
            self.num_threads,
            "must be >= 1 or null",
        )


@dataclass
class Config:
    """The whole configuration; ``config/config.yaml`` documents every key."""

    model: ModelConfig = field(default_factory=ModelConfig)
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    stage_a: StageAConfig = field(default_factory=StageAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON serialisable)."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


def _check(condition: bool, key: str, value: Any, requirement: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r} {requirement}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int → float only)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r} must be {_type_name(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}={value!r} must be {_type_name(tp)}{hint}")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be {_type_name(tp)}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of keys, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string: accept it as a number.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} must be a string")
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - a bug here


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = str(raw_key)
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            valid = ", ".join(names)
            raise ConfigError(f"unknown key '{full}'{hint} (valid keys here: {valid})")
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as exc:  # pragma: no cover - guarded by the key check above
        raise ConfigError(f"{prefix or 'config'}: {exc}") from None


ALIASES: dict[str, str] = {
    # Older names of this project -> the spec's names. Either is accepted; a file that sets
    # both is an error (one source of truth); the resolved config saved with every checkpoint
    # uses the spec's name.
    "stage_a.num_epochs": "stage_a.epochs",
    "stage_a.loss_weights.cross_entropy": "stage_a.loss_weights.collaborative",
}


def canonical_key(path: list[str]) -> list[str]:
    """The spec's name of a dotted key path (aliases resolved)."""
    return ALIASES.get(".".join(path), ".".join(path)).split(".")


def normalize_aliases(raw: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Rename alias keys of a raw mapping to the spec's names, in place.

    Raises:
        ConfigError: the mapping sets both a key and its alias.
    """
    for alias, canonical in ALIASES.items():
        *parents, leaf = alias.split(".")
        node: Any = raw
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        target = canonical.split(".")[-1]
        if target in node:
            raise ConfigError(
                f"{source}: '{alias}' and '{canonical}' are the same setting ('{leaf}' is the older "
                f"name of '{target}'): set only '{canonical}'"
            )
        node[target] = node.pop(leaf)
    return raw


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value as YAML) into (path, value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. stage_a.batch_size=32")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. stage_a.batch_size=32")
    try:
        value = _load_yaml(raw) if raw.strip() != "" else None
    except _DuplicateKeyError as exc:
        raise ConfigError(f"--set {text!r}: {exc.problem}") from None
    except yaml.YAMLError:
        value = raw
    return canonical_key(key.split(".")), value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw (not yet validated) config mapping."""
    for text in overrides or []:
        path, value = parse_override(text)
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"--set {text!r}: '{'.'.join(path[: i + 1])}' is a value, not a section"
                )
            node = child
        node[path[-1]] = value
    return raw


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key given twice in one mapping.

    Plain YAML keeps the last value silently: a section written twice (``model:`` ... ``model:``)
    would drop every key of the first without a word.
    """

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: SafeLoader reports it itself
                break
            if duplicate:
                raise _DuplicateKeyError(
                    None, None, f"key {key!r} given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    """Parse YAML safely, a key given twice in one mapping being an error (config files and
    ``--set`` values alike)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.__class__.__name__})") from None
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Validate a raw mapping into a :class:`Config`."""
    raw = normalize_aliases(raw, source)
    try:
        return _build(Config, raw, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides.

    Args:
        path: YAML file; ``None`` starts from the built-in defaults.
        overrides: ``section.key=value`` strings, applied in order.
    """
    source = str(path) if path is not None else "config"
    raw = {}
    if path is not None:
        raw = normalize_aliases(_drop_format_version(read_yaml(path), source), source)
    raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, source)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from .io_utils import atomic_write_text

    text = yaml.safe_dump(
        {"config_format_version": CONFIG_FORMAT_VERSION, **config.to_dict()}, sort_keys=False
    )
    atomic_write_text(path, text)


def load_saved_config(path: str | Path) -> Config:
    """Read a config written by :func:`save_config` (checkpoints, processed data)."""
    return config_from_dict(_drop_format_version(read_yaml(path), str(path)), str(path))


def _drop_format_version(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Remove the ``config_format_version`` stamp of a saved config, checking its value.

    A checkpoint's ``config.yaml`` is a valid ``--config`` (to resume or retrain with it).
    """
    version = raw.pop("config_format_version", CONFIG_FORMAT_VERSION)
    if version != CONFIG_FORMAT_VERSION:
        raise ConfigError(
            f"{source}: config_format_version {version!r} is not supported "
            f"(this version of llm_recommender reads {CONFIG_FORMAT_VERSION})"
        )
    return raw
