"""Loading the LLM backbone: pretrained (hub name, local folder, GGUF file) or random, then
frozen, fully fine-tuned or LoRA-tuned.

The backbone is a decoder *without* its LM head (``AutoModel``): the recommender feeds it soft
tokens through ``inputs_embeds`` and reads its hidden states. Its own token embedding is never
used, so it is replaced by a frozen one-row table (a 49K x 576 matrix saved for nothing is
28M parameters at SmolLM2 scale, and a parameter without gradient breaks DDP).

Resolution of ``model.base_llm``:

- an existing ``.gguf`` file, or a folder plus ``model.gguf_file``: transformers' GGUF loader
  (weights dequantised to ``model.dtype``; needs the ``gguf`` package);
- an existing folder: ``from_pretrained(folder)``;
- anything else is a hub name, read from the Hugging Face cache (``local_files_only`` when
  ``HF_HUB_OFFLINE`` is set); a miss is a one-line :class:`ModelLoadError` saying how to make it
  available.

``random_init_stage_a_llm: true`` needs no weights: the architecture comes from the folder's or
cache's config when there is one, else from :data:`KNOWN_CONFIGS` (``gpt2`` works on a machine
that never downloaded it). ``num_layers``, ``hidden_size``, ``num_heads``, ``intermediate_size``
and ``dropout`` then reshape it, so a SASRec-sized backbone (2 layers, width 64) is a config.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError, ModelLoadError, one_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_GPT2_DROPOUT = {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}


def _gpt2(n_embd: int, n_layer: int, n_head: int) -> dict[str, Any]:
    return {
        "model_type": "gpt2",
        "n_embd": n_embd,
        "n_layer": n_layer,
        "n_head": n_head,
        "n_positions": 1024,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        **_GPT2_DROPOUT,
    }


def _qwen2(hidden: int, inter: int, layers: int, heads: int, kv: int, max_pos: int) -> dict[str, Any]:
    return {
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    }


def _llama(
    hidden: int,
    inter: int,
    layers: int,
    heads: int,
    kv: int,
    max_pos: int,
    rope: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-5,
        "rope_parameters": rope,
        **extra,
    }


_LLAMA3_ROPE = {
    "rope_theta": 500000.0,
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    # The shapes of well-known backbones, so that random_init_stage_a_llm works offline on a
    # machine that never downloaded them. The vocabulary is irrelevant (soft tokens only).
    "gpt2": _gpt2(768, 12, 12),
    "distilgpt2": _gpt2(768, 6, 12),
    "gpt2-medium": _gpt2(1024, 24, 16),
    "gpt2-large": _gpt2(1280, 36, 20),
    "gpt2-xl": _gpt2(1600, 48, 25),
    "qwen2-0.5b": _qwen2(896, 4864, 24, 14, 2, 131072),
    "qwen2-1.5b": _qwen2(1536, 8960, 28, 12, 2, 131072),
    "qwen2.5-0.5b": _qwen2(896, 4864, 24, 14, 2, 32768),
    "qwen2.5-1.5b": _qwen2(1536, 8960, 28, 12, 2, 32768),
    "smollm2-135m": _llama(576, 1536, 30, 9, 3, 8192, {"rope_theta": 100000.0, "rope_type": "default"}),
    "smollm2-360m": _llama(960, 2560, 32, 15, 5, 8192, {"rope_theta": 100000.0, "rope_type": "default"}),
    "smollm-135m": _llama(576, 1536, 30, 9, 3, 2048, {"rope_theta": 10000.0, "rope_type": "default"}),
    "llama-3.2-1b": _llama(2048, 8192, 16, 32, 8, 131072, _LLAMA3_ROPE, head_dim=64),
    "tinyllama-1.1b-chat-v1.0": _llama(
        2048, 5632, 22, 32, 4, 2048, {"rope_theta": 10000.0, "rope_type": "default"}
    ),
    "tinyllama_v1.1": _llama(2048, 5632, 22, 32, 4, 2048, {"rope_theta": 10000.0, "rope_type": "default"}),
}


def known_config_key(name: str) -> str | None:
    """The :data:`KNOWN_CONFIGS` key for a hub name, or None.

    ``openai-community/gpt2``, ``gpt2``, ``Qwen/Qwen2.5-0.5B-Instruct`` and
    ``HuggingFaceTB/SmolLM2-135M-Instruct`` all resolve (instruction-tuned variants share the
    shapes of their base model).
    """
    key = name.strip().rstrip("/").split("/")[-1].lower()
    if key in KNOWN_CONFIGS:
        return key
    for suffix in ("-instruct", "-chat"):
        if key.endswith(suffix) and key[: -len(suffix)] in KNOWN_CONFIGS:
            return key[: -len(suffix)]
    return None


# --------------------------------------------------------------------------------------------
# Resolving base_llm
# --------------------------------------------------------------------------------------------


def _offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once at import.
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _resolve_source(model_config: ModelConfig) -> tuple[str, str, str | None]:
    """Return (kind, location, gguf_file) with kind one of ``gguf``, ``folder``, ``hub``."""
    name = model_config.base_llm
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf"):
        if model_config.gguf_file is not None:
            raise ConfigError(
                f"model.gguf_file={model_config.gguf_file!r} is set but model.base_llm={name!r} is "
                "already a .gguf file: set one of them"
            )
        if not path.is_file():
            raise ModelLoadError(f"model.base_llm={name!r}: GGUF file not found")
        return "gguf", str(path.parent), path.name
    if model_config.gguf_file is not None:
        if not path.is_dir():
            raise ModelLoadError(
                f"model.base_llm={name!r}: folder not found (model.gguf_file={model_config.gguf_file!r} "
                "needs base_llm to be the folder holding it)"
            )
        if not (path / model_config.gguf_file).is_file():
            raise ModelLoadError(f"model.gguf_file={model_config.gguf_file!r}: not found in {path}")
        return "gguf", str(path), model_config.gguf_file
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = (
                f"; it holds {', '.join(ggufs)}: set model.gguf_file to one of them" if ggufs else ""
            )
            raise ModelLoadError(f"model.base_llm={name!r}: folder has no config.json{hint}")
        return "folder", str(path), None
    if name.startswith(("/", "./", "../", "~")) or path.is_file():
        raise ModelLoadError(f"model.base_llm={name!r}: no such model folder")
    return "hub", name, None


def _hub_missing_message(name: str, exc: Exception) -> str:
    return one_line(
        f"model.base_llm={name!r} could not be loaded from the Hugging Face cache"
        f"{' (HF_HUB_OFFLINE is set)' if _offline() else ''}: {exc.__class__.__name__}. "
        f"Download it on a connected machine with `huggingface-cli download {name}` and copy the "
        "cache (~/.cache/huggingface) or the model folder here (then give the folder as base_llm), "
        "or set model.random_init_stage_a_llm: true to train it from scratch"
    )


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(
            "model.base_llm is a GGUF file but the `gguf` package is not installed: "
            "pip install 'llm_recommender[gguf]' (or pip install gguf)"
        )


# --------------------------------------------------------------------------------------------
# Architecture config
# --------------------------------------------------------------------------------------------


def _load_pretrained_config(model_config: ModelConfig, kind: str, location: str, gguf_file: str | None):
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"trust_remote_code": model_config.trust_remote_code}
    if kind == "gguf":
        _require_gguf()
        kwargs["gguf_file"] = gguf_file
    if kind == "hub":
        kwargs["local_files_only"] = _offline()
    try:
        return AutoConfig.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        if kind == "hub":
            raise ModelLoadError(_hub_missing_message(location, exc)) from None
        raise ModelLoadError(
            one_line(f"model.base_llm={model_config.base_llm!r}: cannot read its config ({exc})")
        ) from None


def _random_init_config(model_config: ModelConfig, kind: str, location: str, gguf_file: str | None):
    """The architecture's config: from the folder/GGUF/cache when there, else the built-in table."""
    from transformers import AutoConfig

    if kind in ("folder", "gguf"):
        return _load_pretrained_config(model_config, kind, location, gguf_file), kind
    try:
        # Never reach the network for a random init: the cache or the table.
        config = AutoConfig.from_pretrained(
            location, local_files_only=True, trust_remote_code=model_config.trust_remote_code
        )
        return config, "cache"
    except (OSError, ValueError):
        key = known_config_key(location)
        if key is None:
            raise ModelLoadError(
                one_line(
                    f"model.base_llm={location!r} with random_init_stage_a_llm: its config is not in the "
                    "Hugging Face cache and it is not a built-in architecture (built in: "
                    f"{', '.join(sorted(KNOWN_CONFIGS))}); give a folder holding its config.json"
                )
            ) from None
        values = dict(KNOWN_CONFIGS[key])
        model_type = values.pop("model_type")
        return AutoConfig.for_model(model_type, **values), "builtin"


def _num_layers(config) -> int:
    return int(config.num_hidden_layers)


def _set_num_layers(config, k: int) -> None:
    # num_hidden_layers is an alias of GPT-2's n_layer (attribute_map), so this is generic.
    config.num_hidden_layers = k
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) != k:
        # Newer configs list the attention type of every layer (Qwen2 sliding windows, ...).
        config.layer_types = (layer_types + [layer_types[-1]] * k)[:k]


def _set_dropout(config, p: float) -> None:
    for attr in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout"):
        if hasattr(config, attr):
            setattr(config, attr, p)


def _set_residual_dropout(config, model_config: ModelConfig) -> None:
    p = model_config.residual_dropout
    if p is None:
        return
    attrs = [a for a in ("resid_pdrop", "hidden_dropout") if hasattr(config, a)]
    if not attrs:
        raise ConfigError(
            f"model.residual_dropout: {config.model_type} has no residual dropout setting (set it to null)"
        )
    for attr in attrs:
        setattr(config, attr, p)


def _first_attr(obj: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    """The first of ``names`` that ``obj`` has as a submodule (family-specific names)."""
    return next((getattr(obj, n) for n in names if isinstance(getattr(obj, n, None), nn.Module)), None)


def _change_every_layer(backbone: nn.Module, setting: str, change, missing: str, default: str) -> None:
    """Apply ``change(layer) -> bool`` to every decoder layer; a ConfigError naming
    ``setting`` and its ``default`` when no layer has what it changes (``missing``)."""
    layers = _decoder_layers(backbone)
    changed = sum(bool(change(layer)) for layer in (layers if layers is not None else []))
    if not changed:
        raise ConfigError(
            f"{setting}: no {missing} found in {type(backbone).__name__}'s layers (set it to {default})"
        )


def _add_mlp_dropout(backbone: nn.Module, p: float) -> None:
    """Dropout after the MLP activation of every decoder layer (``model.mlp_dropout``).

    The activation module is wrapped, so the weights and their names are unchanged and any
    checkpoint loads either way. A gated MLP (Llama, Qwen2: ``down(act(gate(x)) * up(x))``)
    drops the same hidden units as dropping after the product would.
    """

    def change(layer: nn.Module) -> bool:
        mlp = getattr(layer, "mlp", None)
        for attr in ("act", "act_fn"):
            act = getattr(mlp, attr, None) if mlp is not None else None
            if isinstance(act, nn.Module):
                setattr(mlp, attr, nn.Sequential(act, nn.Dropout(p)))
                return True
        return False

    _change_every_layer(backbone, "model.mlp_dropout", change, "MLP activation", "null")


class _StreamHooks:
    """Hooks around one layer that read the residual stream ``h``: a forward pre-hook on the
    layer's norm keeps the ``h`` it is given, for hooks later in the layer. Hooks leave the
    weights and their names as they are."""

    def __init__(self) -> None:
        self.stream: torch.Tensor | None = None

    def keep_stream(self, module: nn.Module, args: tuple) -> None:
        self.stream = args[0]


class _NormalisedMlpResidual(_StreamHooks):
    """Turns a pre-norm layer's ``h + mlp(norm(h))`` into ``norm(h) + mlp(norm(h))``: a hook
    on the MLP adds ``norm(h) - h`` to its output, so the layer's own residual addition yields
    SASRec's sum."""

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + (args[0] - self.stream)


class _StreamKeysValues(_StreamHooks):
    """Makes a pre-norm layer's attention read its keys and values from ``h``: hooks on the key
    and value projections (Llama's ``k_proj``/``v_proj``, or the K and V thirds of GPT-2's fused
    ``c_attn``) replace their output by the same map of ``h``; the queries still read
    ``norm(h)``."""

    def linear(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.stream, module.weight, module.bias)

    def fused_qkv(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # transformers' Conv1D: y = x @ W + b, W of shape (in, 3 * width), columns [Q | K | V].
        width = output.shape[-1] // 3
        kv = self.stream @ module.weight[:, width:] + module.bias[width:]
        return torch.cat([output[..., :width], kv], dim=-1)


def _normalise_mlp_residual(backbone: nn.Module) -> None:
    """``model.mlp_residual: normalised``: every layer's MLP adds onto its normalised input."""

    def change(layer: nn.Module) -> bool:
        norm = _first_attr(layer, ("ln_2", "post_attention_layernorm"))
        mlp = _first_attr(layer, ("mlp",))
        if norm is None or mlp is None:
            return False
        hooks = _NormalisedMlpResidual()
        norm.register_forward_pre_hook(hooks.keep_stream)
        mlp.register_forward_hook(hooks)
        return True

    _change_every_layer(backbone, "model.mlp_residual", change, "MLP norm (ln_2 / post_attention_layernorm)", "stream")


def _stream_keys_values(backbone: nn.Module) -> None:
    """``model.attention_kv: stream``: keys and values from ``h``, queries from ``norm(h)``."""

    def change(layer: nn.Module) -> bool:
        norm = _first_attr(layer, ("ln_1", "input_layernorm"))
        attn = _first_attr(layer, ("attn", "self_attn"))
        if norm is None or attn is None:
            return False
        hooks = _StreamKeysValues()
        if hasattr(attn, "c_attn") and not getattr(attn, "is_cross_attention", False):
            targets = [(attn.c_attn, hooks.fused_qkv)]
        elif all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("k_proj", "v_proj")):
            targets = [(attn.k_proj, hooks.linear), (attn.v_proj, hooks.linear)]
        else:
            return False
        norm.register_forward_pre_hook(hooks.keep_stream)
        for module, hook in targets:
            module.register_forward_hook(hook)
        return True

    _change_every_layer(backbone, "model.attention_kv", change, "attention norm with key/value projections", "normalised")


def _init_position_table(backbone: nn.Module, std: float) -> None:
    """``model.position_init_std``: re-draw the learned absolute position table."""
    table = getattr(backbone, "wpe", None)
    if not isinstance(table, nn.Embedding):
        raise ConfigError(
            f"model.position_init_std: {backbone.config.model_type} has no learned position table "
            "(rotary or no positions; set it to null)"
        )
    with torch.no_grad():
        nn.init.normal_(table.weight, std=std)


def _apply_random_overrides(config, model_config: ModelConfig, max_tokens: int) -> None:
    """Reshape a config for random init: layers, width, heads, MLP width, dropout."""
    if model_config.num_layers is not None:
        _set_num_layers(config, model_config.num_layers)
    width_changed = model_config.hidden_size is not None
    hidden = model_config.hidden_size or int(config.hidden_size)
    heads = model_config.num_heads
    if heads is None:
        own = int(config.num_attention_heads)
        heads = own if hidden % own == 0 and (not width_changed or hidden // own >= 16) else max(1, hidden // 64)
    if hidden % heads != 0:
        raise ConfigError(
            f"model.num_heads={heads} must divide the width {hidden} (set model.num_heads explicitly)"
        )
    config.hidden_size = hidden
    config.num_attention_heads = heads
    kv = getattr(config, "num_key_value_heads", None)
    if kv is not None and heads % int(kv) != 0:
        config.num_key_value_heads = heads
    if getattr(config, "head_dim", None) is not None:
        config.head_dim = hidden // heads
    if model_config.intermediate_size is not None or width_changed:
        inter = model_config.intermediate_size or 4 * hidden
        if config.model_type == "gpt2":
            config.n_inner = inter
        elif hasattr(config, "intermediate_size"):
            config.intermediate_size = inter
    if model_config.dropout is not None:
        _set_dropout(config, model_config.dropout)
    _set_residual_dropout(config, model_config)
    if model_config.initializer_range is not None:
        config.initializer_range = model_config.initializer_range
    if model_config.activation is not None:
        attr = "activation_function" if config.model_type == "gpt2" else "hidden_act"
        if not hasattr(config, attr):
            raise ConfigError(f"model.activation: {config.model_type} has no {attr} setting to change")
        from transformers.activations import ACT2FN

        if model_config.activation not in ACT2FN:
            raise ConfigError(
                f"model.activation={model_config.activation!r} is not a transformers activation "
                f"(e.g. {', '.join(sorted(k for k in ACT2FN if k in ('gelu', 'gelu_new', 'relu', 'silu')))})"
            )
        setattr(config, attr, model_config.activation)
    # Learned absolute positions (GPT-2) must cover [user, item_1..item_T].
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and max_pos < max_tokens:
        config.max_position_embeddings = max_tokens
    # The token table is replaced by one row anyway: a tiny vocabulary, valid special ids.
    config.vocab_size = 1
    for attr in ("bos_token_id", "eos_token_id"):
        if hasattr(config, attr):
            setattr(config, attr, 0)
    if hasattr(config, "pad_token_id"):
        config.pad_token_id = None


def _check_pretrained_overrides(model_config: ModelConfig) -> None:
    for key in ("hidden_size", "num_heads", "intermediate_size", "initializer_range", "position_init_std", "activation"):
        if getattr(model_config, key) is not None:
            raise ConfigError(
                f"model.{key}={getattr(model_config, key)!r} applies to random_init_stage_a_llm: true only; "
                "a pretrained backbone keeps its own shape (set it to null)"
            )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _decoder_layers(backbone: nn.Module) -> nn.ModuleList | None:
    for attr in ("h", "layers"):
        layers = getattr(backbone, attr, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    return None


def _replace_token_embedding(backbone: nn.Module, hidden_size: int, dtype: torch.dtype) -> None:
    """Swap the unused vocabulary table for a frozen single row (soft tokens only)."""
    stub = nn.Embedding(1, hidden_size, dtype=dtype)
    nn.init.zeros_(stub.weight)
    stub.weight.requires_grad_(False)
    backbone.set_input_embeddings(stub)
    backbone.config.vocab_size = 1


def load_backbone(model_config: ModelConfig) -> tuple[nn.Module, int, dict[str, Any]]:
    """Build the decoder backbone (no LM head) described by ``model_config``.

    Args:
        model_config: ``config.model``. Reads base_llm, gguf_file, random_init_stage_a_llm,
            num_layers, hidden_size, num_heads, intermediate_size, dropout, dtype,
            attn_implementation, trust_remote_code and max_seq_len.

    Returns:
        ``(backbone, hidden_size, info)``: the ``AutoModel`` in eval mode (the caller's
        ``.train()`` switches it) with its token embedding replaced by a frozen one-row table;
        its width; and ``info`` with ``name``, ``family`` (the config's model_type), ``source``
        (``pretrained``, ``gguf`` or ``random``), ``config_source``, ``num_layers``,
        ``hidden_size``, ``num_heads``, ``num_parameters`` (without the token table), ``dtype``.

    Raises:
        ModelLoadError: weights or config not found / unreadable, ``gguf`` missing.
        ConfigError: a shape override that does not apply, too many layers, too short a context.
    """
    from transformers import AutoModel

    dtype = DTYPES[model_config.dtype]
    max_tokens = model_config.max_seq_len + (1 if model_config.use_user_token else 0)
    kind, location, gguf_file = _resolve_source(model_config)
    common: dict[str, Any] = {"dtype": dtype, "trust_remote_code": model_config.trust_remote_code}
    if model_config.attn_implementation is not None:
        common["attn_implementation"] = model_config.attn_implementation

    if model_config.random_init_stage_a_llm:
        config, config_source = _random_init_config(model_config, kind, location, gguf_file)
        config = copy.deepcopy(config)
        _apply_random_overrides(config, model_config, max_tokens)
        try:
            backbone = AutoModel.from_config(config, **common)
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(
                one_line(f"model.base_llm={model_config.base_llm!r}: cannot build a random model ({exc})")
            ) from None
        source = "random"
        if model_config.position_init_std is not None:
            _init_position_table(backbone, model_config.position_init_std)
    else:
        _check_pretrained_overrides(model_config)
        config = copy.deepcopy(_load_pretrained_config(model_config, kind, location, gguf_file))
        config_source = kind
        total_layers = _num_layers(config)
        if model_config.num_layers is not None:
            if model_config.num_layers > total_layers:
                raise ConfigError(
                    f"model.num_layers={model_config.num_layers} exceeds the {total_layers} layers of "
                    f"{model_config.base_llm!r}"
                )
            # Building only k layers skips the memory of the rest; their weights are ignored.
            _set_num_layers(config, model_config.num_layers)
        if model_config.dropout is not None:
            _set_dropout(config, model_config.dropout)
        _set_residual_dropout(config, model_config)
        max_pos = getattr(config, "max_position_embeddings", None)
        if config.model_type == "gpt2" and max_pos is not None and max_pos < max_tokens:
            raise ConfigError(
                f"model.max_seq_len={model_config.max_seq_len} needs {max_tokens} positions but "
                f"{model_config.base_llm!r} has {max_pos}"
            )
        kwargs = dict(common, config=config, output_loading_info=True)
        if kind == "gguf":
            _require_gguf()
            kwargs["gguf_file"] = gguf_file
        if kind == "hub":
            kwargs["local_files_only"] = _offline()
        try:
            backbone, loading_info = AutoModel.from_pretrained(location, **kwargs)
        except (OSError, ValueError) as exc:
            if kind == "hub":
                raise ModelLoadError(_hub_missing_message(location, exc)) from None
            raise ModelLoadError(
                one_line(f"model.base_llm={model_config.base_llm!r}: cannot load the weights ({exc})")
            ) from None
        embedding_names = {n for n, p in backbone.named_parameters() if p is backbone.get_input_embeddings().weight}
        missing = [k for k in loading_info.get("missing_keys", []) if k not in embedding_names]
        if missing:
            # A silently random layer would look like a trained model: refuse it.
            raise ModelLoadError(
                one_line(
                    f"model.base_llm={model_config.base_llm!r}: {len(missing)} weights missing from the "
                    f"checkpoint (e.g. {', '.join(sorted(missing)[:3])}); is it a decoder of this family?"
                )
            )
        source = "gguf" if kind == "gguf" else "pretrained"
        layers = _decoder_layers(backbone)
        if model_config.num_layers is not None and layers is not None and len(layers) > model_config.num_layers:
            # Families whose config does not drive the layer count: cut after loading.
            del layers[model_config.num_layers :]

    hidden_size = int(backbone.config.hidden_size)
    _replace_token_embedding(backbone, hidden_size, dtype)
    if model_config.mlp_dropout:
        _add_mlp_dropout(backbone, model_config.mlp_dropout)
    if model_config.mlp_residual == "normalised":
        _normalise_mlp_residual(backbone)
    if model_config.attention_kv == "stream":
        _stream_keys_values(backbone)
    backbone.eval()
    check_causal(backbone, model_config.base_llm)
    layers = _decoder_layers(backbone)
    info = {
        "name": model_config.base_llm,
        "family": backbone.config.model_type,
        "source": source,
        "config_source": config_source,
        "num_layers": len(layers) if layers is not None else _num_layers(backbone.config),
        "hidden_size": hidden_size,
        "num_heads": int(backbone.config.num_attention_heads),
        "num_parameters": sum(p.numel() for p in backbone.parameters()) - backbone.get_input_embeddings().weight.numel(),
        "dtype": model_config.dtype,
    }
    return backbone, hidden_size, info


def check_causal(backbone: nn.Module, name: str, num_tokens: int = 5) -> None:
    """Refuse a backbone whose states at position t depend on tokens after t.

    ``AutoModel`` also builds encoders (BERT, RoBERTa, ...): trained on next-item targets they
    would read the answer from the future and every metric would be meaningless. Whatever the
    architecture claims, this measures it: two random soft-token sequences that differ only in
    their last token must give the same states at every earlier position.

    Args:
        backbone: the loaded ``AutoModel`` (eval mode).
        name: ``model.base_llm``, for the message.
        num_tokens: probe length.

    Raises:
        ModelLoadError: the backbone is an encoder-decoder or its earlier states moved.
    """
    config = backbone.config
    family = getattr(config, "model_type", type(backbone).__name__)
    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(
            f"model.base_llm={name!r} ({family}) is an encoder-decoder model; the recommender needs a "
            "causal decoder (GPT-2, Qwen2, Llama, ...)"
        )
    parameter = next(backbone.parameters())
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, num_tokens, int(config.hidden_size), generator=generator)
    tokens[1, :-1] = tokens[0, :-1]  # the same sequence but for its last token, made loud:
    tokens[1, -1] *= 30.0  # an encoder's earlier states then move by O(1), a decoder's not at all
    tokens = tokens.to(device=parameter.device, dtype=parameter.dtype)
    mask = torch.ones(2, num_tokens, dtype=torch.long, device=parameter.device)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            states = backbone(inputs_embeds=tokens, attention_mask=mask).last_hidden_state.float()
    finally:
        backbone.train(was_training)
    earlier = states[:, :-1]  # (2, T-1, d)
    moved = float((earlier[0] - earlier[1]).abs().max())
    tolerance = (1e-5 if parameter.dtype == torch.float32 else 1e-2) * (1.0 + float(earlier.abs().max()))
    if not moved <= tolerance:
        raise ModelLoadError(
            f"model.base_llm={name!r} ({family}) is not a causal decoder: changing the last token moved the "
            f"states of earlier positions by up to {moved:.3g}, so it would see future items; use a decoder "
            "LLM (GPT-2, Qwen2, Llama, ...)"
        )


# --------------------------------------------------------------------------------------------
# Fine-tuning modes
# --------------------------------------------------------------------------------------------


def default_lora_targets(backbone: nn.Module) -> tuple[list[str], bool]:
    """Attention projections to adapt, and whether they are GPT-2 style Conv1D (fan_in_fan_out)."""
    from transformers.pytorch_utils import Conv1D

    names = {name.rsplit(".", 1)[-1]: module for name, module in backbone.named_modules()}
    if "q_proj" in names and "v_proj" in names:  # Llama, Qwen2, Mistral, SmolLM, ...
        targets = [t for t in ("q_proj", "k_proj", "v_proj", "o_proj") if t in names]
        return targets, False
    if "c_attn" in names:  # GPT-2: fused q/k/v projection
        return ["c_attn"], isinstance(names["c_attn"], Conv1D)
    raise ConfigError(
        f"model.lora.target_modules=null: no known attention projections in {type(backbone).__name__}; "
        "list the module names to adapt in model.lora.target_modules"
    )


def apply_finetune_mode(backbone: nn.Module, model_config: ModelConfig) -> nn.Module:
    """Set which backbone weights train: ``frozen``, ``full`` or ``lora`` (``model.finetune_mode``).

    Args:
        backbone: the module returned by :func:`load_backbone`.
        model_config: ``config.model`` (``finetune``/``freeze_llm_stage_a`` and ``lora.*``).

    Returns:
        The backbone (the same module for frozen/full; a ``peft.PeftModel`` wrapping it for lora).
        The token-embedding stub never trains.
    """
    mode = model_config.finetune_mode
    if mode == "frozen":
        backbone.requires_grad_(False)
        return backbone
    if mode == "full":
        backbone.requires_grad_(True)
        backbone.get_input_embeddings().requires_grad_(False)
        return backbone
    try:
        from peft import LoraConfig, get_peft_model  # ~10 s to import: only when asked for
    except ImportError:
        raise ModelLoadError(
            "model.finetune=lora needs the `peft` package: pip install 'llm_recommender[lora]'"
        ) from None
    from transformers.pytorch_utils import Conv1D

    lora = model_config.lora
    if lora.target_modules:
        targets = list(lora.target_modules)
        present = {name.rsplit(".", 1)[-1] for name, _ in backbone.named_modules()}
        unknown = [t for t in targets if t not in present]
        if unknown:
            raise ConfigError(
                f"model.lora.target_modules: {unknown} not found in {type(backbone).__name__} "
                f"(e.g. {', '.join(sorted(n for n in present if n)[:8])})"
            )
        fan_in_fan_out = any(
            isinstance(m, Conv1D) for n, m in backbone.named_modules() if n.rsplit(".", 1)[-1] in targets
        )
    else:
        targets, fan_in_fan_out = default_lora_targets(backbone)
    backbone.requires_grad_(False)
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
    )
    return get_peft_model(backbone, peft_config)
