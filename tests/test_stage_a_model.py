"""StageAModel: training on sequential data, fine-tuning modes, padding, checkpoints."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import shared_path
from llm_recommender.config import load_config
from llm_recommender.errors import CheckpointError, ConfigError
from llm_recommender.models.stage_a_model import StageAModel, build_model, count_parameters, keep_recent

NUM_USERS, NUM_ITEMS, SEQ_LEN = 8, 20, 8
RANDOM_TINY = {
    "gpt2": ["model.random_init_stage_a_llm=true", "model.base_llm=gpt2"],
    "qwen2": ["model.random_init_stage_a_llm=true", "model.base_llm=Qwen/Qwen2.5-0.5B"],
    "llama": ["model.random_init_stage_a_llm=true", "model.base_llm=HuggingFaceTB/SmolLM2-135M"],
}
SHAPE = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=2", "model.dropout=0.0"]
# The default init_std 0.02 at d=16 starts near a saddle (tied scores ~0: a ~15-step plateau);
# 0.1 lets 30 steps show the learning itself.
INIT = "embeddings.init_std=0.1"


def _config(*overrides):
    return load_config(
        None, ["model.embedding_dim=16", f"model.max_seq_len={SEQ_LEN}", INIT, *SHAPE, *overrides]
    )


def _stories_config(*overrides):
    folder = shared_path("models", "stories260k-llama")
    return load_config(
        None, [f"model.base_llm={folder}", "model.embedding_dim=16", f"model.max_seq_len={SEQ_LEN}", INIT, *overrides]
    )


def make_batch(generator, batch_size=16, use_user_token=True):
    """Item i is followed by i+1 (wrapping): windows of random length, right-padded with 0."""
    user_ids = torch.randint(1, NUM_USERS + 1, (batch_size,), generator=generator)
    starts = torch.randint(1, NUM_ITEMS + 1, (batch_size,), generator=generator)
    lengths = torch.randint(3, SEQ_LEN + 1, (batch_size,), generator=generator)
    offsets = torch.arange(SEQ_LEN + 1)
    windows = (starts[:, None] - 1 + offsets) % NUM_ITEMS + 1  # (B, T+1)
    window_mask = offsets[None, :] <= lengths[:, None]  # n inputs + 1 target
    windows = windows * window_mask
    item_seq = windows[:, :SEQ_LEN] * (offsets[None, :SEQ_LEN] < lengths[:, None])
    targets = windows if use_user_token else windows[:, 1:]
    return {"user_ids": user_ids, "item_seq": item_seq, "targets": targets}


def _train(model, steps=30, lr=1e-2, seed=0, use_user_token=True):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        out = model.calculate_loss(make_batch(generator, use_user_token=use_user_token))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["cross_entropy"].item())
    return losses


def test_batch_layout_matches_the_trainer_contract():
    batch = make_batch(torch.Generator().manual_seed(3), batch_size=4)
    for seq, tgt in zip(batch["item_seq"], batch["targets"]):
        n = int((seq != 0).sum())
        assert torch.equal(tgt[:n], seq[:n]) and tgt[n] == seq[n - 1] % NUM_ITEMS + 1
        assert torch.all(tgt[n + 1 :] == 0)


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "llama"])
def test_random_backbones_learn_the_next_item(family):
    torch.manual_seed(0)
    model = build_model(_config(*RANDOM_TINY[family], "model.finetune=full"), NUM_USERS, NUM_ITEMS)
    losses = _train(model)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > 2.5  # about log(20) at the start
    assert last < 0.6 * first, losses


def test_items_only_sequence_learns_too():
    torch.manual_seed(0)
    model = build_model(_config(*RANDOM_TINY["gpt2"], "model.use_user_token=false"), NUM_USERS, NUM_ITEMS)
    losses = _train(model, use_user_token=False)
    assert sum(losses[-3:]) < 0.6 * sum(losses[:3])


def test_frozen_pretrained_backbone_stays_bit_identical_and_is_not_checkpointed():
    torch.manual_seed(0)
    model = build_model(_stories_config("model.freeze_llm_stage_a=true"), NUM_USERS, NUM_ITEMS)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    table_before = model.embeddings.item_embeddings.weight.detach().clone()
    assert count_parameters(model)["backbone_trainable"] == 0
    losses = _train(model, steps=5)
    assert all(torch.equal(backbone_before[k], v) for k, v in model.backbone.state_dict().items())
    assert not torch.equal(table_before, model.embeddings.item_embeddings.weight)
    assert losses[-1] < losses[0]
    state = model.trainable_state_dict()
    assert state and not any(k.startswith("backbone.") for k in state)
    assert {k.split(".")[0] for k in state} == {"embeddings", "out_proj"}


def test_lora_trains_only_the_adapter():
    torch.manual_seed(0)
    model = build_model(_config(*RANDOM_TINY["gpt2"], "model.finetune=lora", "model.lora.r=4"), NUM_USERS, NUM_ITEMS)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    counts = count_parameters(model)
    lora_count = sum(p.numel() for n, p in model.backbone.named_parameters() if "lora_" in n)
    assert counts["backbone_trainable"] == lora_count > 0
    _train(model, steps=5)
    after = model.backbone.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_B" in k for k in changed)  # B starts at zero: it moved


def _padded_pair(item_lists, width):
    right = torch.zeros(len(item_lists), width, dtype=torch.long)
    left = torch.zeros(len(item_lists), width, dtype=torch.long)
    for row, items in enumerate(item_lists):
        right[row, : len(items)] = torch.tensor(items)
        left[row, width - len(items) :] = torch.tensor(items)
    return left, right


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("use_user_token", [True, False])
@pytest.mark.parametrize("anchor", ["start", "end"])
def test_left_and_right_padding_give_the_same_user_state(family, use_user_token, anchor):
    torch.manual_seed(0)
    config = _config(*RANDOM_TINY[family], f"model.use_user_token={str(use_user_token).lower()}",
                     f"model.position_anchor={anchor}")
    model = build_model(config, NUM_USERS, NUM_ITEMS).eval()
    left, right = _padded_pair([[3, 4, 5], [7, 8, 9, 10, 11, 12], [1]], SEQ_LEN)
    users = torch.tensor([1, 2, 3])
    with torch.no_grad():
        a = model.user_state(users, left)
        b = model.user_state(users, right)
        unpadded = model.user_state(users[:1], torch.tensor([[3, 4, 5]]))
    assert (a - b).abs().max() < 1e-5
    assert (a[:1] - unpadded).abs().max() < 1e-5


def _pretrained(name):
    return [f"model.base_llm={shared_path('models', name)}", "model.finetune=full"]


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "llama", "stories260k-qwen2", "stories260k-llama"])
@pytest.mark.parametrize("use_user_token", [True, False])
def test_changing_item_t_plus_1_leaves_the_states_up_to_t_unchanged(family, use_user_token):
    """Causality of the whole soft-token network, for every supported family (random and real
    pretrained weights): the state at an output position never depends on a later item."""
    overrides = RANDOM_TINY[family] if family in RANDOM_TINY else _pretrained(family)
    shape = SHAPE if family in RANDOM_TINY else []
    torch.manual_seed(0)
    config = load_config(None, ["model.embedding_dim=16", f"model.max_seq_len={SEQ_LEN}", INIT, *shape,
                                *overrides, f"model.use_user_token={str(use_user_token).lower()}"])
    model = build_model(config, NUM_USERS, NUM_ITEMS).eval()
    users = torch.tensor([2])
    items = torch.tensor([[3, 4, 5, 6, 7, 8]])
    offset = 1 if use_user_token else 0  # output position of item j is j + offset
    with torch.no_grad():
        states = model(users, items)  # (1, S, d)
        for changed_at in range(1, items.shape[1]):
            other = items.clone()
            other[0, changed_at] = 19
            moved = (model(users, other) - states).abs().amax(dim=(0, 2))  # (S,)
            assert moved[: changed_at + offset].max() < 1e-5, (changed_at, moved)
            assert moved[changed_at + offset] > 1e-4  # the changed position does see its item


def test_end_anchor_puts_the_last_item_at_a_fixed_position(monkeypatch):
    torch.manual_seed(0)
    model = build_model(_config(*RANDOM_TINY["gpt2"], "model.position_anchor=end"), NUM_USERS, NUM_ITEMS).eval()
    seen = {}
    original = model.backbone.forward

    def spy(*args, **kwargs):
        seen["position_ids"] = kwargs["position_ids"]
        return original(*args, **kwargs)

    monkeypatch.setattr(model.backbone, "forward", spy)
    _, right = _padded_pair([[3, 4, 5], [7, 8, 9, 10, 11, 12]], SEQ_LEN)
    with torch.no_grad():
        model(torch.tensor([1, 2]), right)
    positions = seen["position_ids"]  # (B, 1 + SEQ_LEN), right padding: last item at 1 + len - 1
    last = SEQ_LEN  # user token + max_seq_len tokens: the last visible one sits at max_seq_len
    assert positions[0, 3].item() == last and positions[1, 6].item() == last
    assert positions[0, :4].tolist() == [last - 3, last - 2, last - 1, last]


def test_histories_longer_than_max_seq_len_keep_the_most_recent_items():
    seq = torch.tensor([[1, 2, 3, 4, 5, 0], [0, 0, 6, 7, 8, 9], [1, 2, 0, 0, 0, 0]])
    assert keep_recent(seq, 3).tolist() == [[3, 4, 5], [7, 8, 9], [1, 2, 0]]
    torch.manual_seed(0)
    model = build_model(_config(*RANDOM_TINY["gpt2"]), NUM_USERS, NUM_ITEMS).eval()
    long_history = torch.arange(1, 16)[None, :]  # 15 items > max_seq_len 8
    scores = model.full_sort_predict(torch.tensor([1]), long_history)
    recent = model.full_sort_predict(torch.tensor([1]), long_history[:, -SEQ_LEN:])
    assert torch.equal(scores, recent)


def test_padding_contributes_nothing_to_the_loss():
    torch.manual_seed(0)
    model = build_model(_config(*RANDOM_TINY["llama"]), NUM_USERS, NUM_ITEMS).eval()
    batch = make_batch(torch.Generator().manual_seed(5), batch_size=6)
    torch.manual_seed(11)
    reference = model.calculate_loss(batch)
    # Extra padding columns, and a different padding row in the item table.
    wider = {
        "user_ids": batch["user_ids"],
        "item_seq": torch.cat([batch["item_seq"], torch.zeros(6, 3, dtype=torch.long)], dim=1),
        "targets": torch.cat([batch["targets"], torch.zeros(6, 3, dtype=torch.long)], dim=1),
    }
    model.max_seq_len = SEQ_LEN + 3
    with torch.no_grad():
        model.embeddings.item_embeddings.weight[0].normal_()
    torch.manual_seed(11)
    padded = model.calculate_loss(wider)
    for key in ("loss", "cross_entropy", "context_bpr", "user_bpr", "l2"):
        assert abs(reference[key].item() - padded[key].item()) < 1e-5, key


def test_scores_layout():
    torch.manual_seed(0)
    model = build_model(_config(*RANDOM_TINY["gpt2"]), NUM_USERS, NUM_ITEMS).eval()
    users, seq = torch.tensor([1, 0]), torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    scores = model.full_sort_predict(users, seq)
    assert scores.shape == (2, NUM_ITEMS + 1) and scores.dtype == torch.float32
    assert torch.all(scores[:, 0] == float("-inf")) and torch.isfinite(scores[:, 1:]).all()
    candidates = torch.tensor([[5, 1, 0], [20, 2, 3]])
    picked = model.predict_candidates(users, seq, candidates)
    assert torch.allclose(picked[:, :2], scores.gather(1, candidates[:, :2]), atol=1e-6)
    assert picked[0, 2] == float("-inf")


def _round_trip(config, tmp_path, train_steps=3):
    torch.manual_seed(0)
    model = build_model(config, NUM_USERS, NUM_ITEMS)
    _train(model, steps=train_steps)
    model.eval()
    save_file(model.trainable_state_dict(), str(tmp_path / "model.safetensors"))
    torch.manual_seed(123)  # a different initialisation: everything must come from the file
    reloaded = build_model(config, NUM_USERS, NUM_ITEMS).eval()
    reloaded.load_trainable_state_dict(load_file(str(tmp_path / "model.safetensors")))
    users, seq = torch.tensor([1, 2, 0]), torch.tensor([[1, 2, 3, 0], [5, 0, 0, 0], [9, 10, 11, 12]])
    assert torch.equal(model.full_sort_predict(users, seq), reloaded.full_sort_predict(users, seq))
    return model


@pytest.mark.parametrize("mode", ["full", "frozen", "lora"])
def test_trainable_state_dict_round_trip_gives_identical_scores(mode, tmp_path):
    model = _round_trip(_config(*RANDOM_TINY["gpt2"], f"model.finetune={mode}"), tmp_path)
    keys = model.trainable_state_dict().keys()
    # A random backbone cannot be re-created from a file name: it is stored in every mode.
    assert any(k.startswith("backbone.") for k in keys)
    assert not any(k.endswith("wte.weight") for k in keys)  # the unused token stub


def test_lora_on_a_pretrained_backbone_checkpoints_only_the_adapter(tmp_path):
    model = _round_trip(_stories_config("model.finetune=lora", "model.lora.r=2"), tmp_path, train_steps=2)
    backbone_keys = [k for k in model.trainable_state_dict() if k.startswith("backbone.")]
    assert backbone_keys and all("lora_" in k for k in backbone_keys)


def test_loading_a_mismatched_checkpoint_is_a_clear_error():
    torch.manual_seed(0)
    model = build_model(_config(*RANDOM_TINY["gpt2"]), NUM_USERS, NUM_ITEMS)
    state = model.trainable_state_dict()
    with pytest.raises(CheckpointError, match="1 missing .*out_proj.weight"):
        model.load_trainable_state_dict({k: v for k, v in state.items() if k != "out_proj.weight"})
    with pytest.raises(CheckpointError, match="unexpected .*extra"):
        model.load_trainable_state_dict({**state, "extra": torch.zeros(1)})
    other = build_model(_config(*RANDOM_TINY["gpt2"]), NUM_USERS, NUM_ITEMS + 5)
    with pytest.raises(CheckpointError, match="item_embeddings.weight has shape \\(26, 16\\)"):
        model.load_trainable_state_dict(other.trainable_state_dict())


def test_sampled_cross_entropy_mode_learns():
    torch.manual_seed(0)
    config = _config(*RANDOM_TINY["qwen2"], "stage_a.ce.mode=sampled", "stage_a.ce.num_sampled=8")
    model = StageAModel(config, NUM_USERS, NUM_ITEMS)
    model.set_item_sampling_distribution(torch.arange(NUM_ITEMS + 1))
    losses = _train(model)
    assert sum(losses[-3:]) < 0.6 * sum(losses[:3])


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.finetune=full"],
        ["model.finetune=full", "model.use_user_token=false"],
        ["model.use_user_token=false", "stage_a.loss_weights.user_bpr=0"],
    ],
)
def test_every_trainable_parameter_gets_a_gradient(overrides):
    # DDP fails on a parameter that requires grad but never receives one.
    torch.manual_seed(0)
    config = _config(*RANDOM_TINY["gpt2"], *overrides)
    model = build_model(config, NUM_USERS, NUM_ITEMS)
    batch = make_batch(torch.Generator().manual_seed(0), use_user_token=config.model.use_user_token)
    model.calculate_loss(batch)["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []


def test_orthogonal_projections_and_the_soft_token_scale():
    """projection_init=orthogonal keeps the ID vectors' norms and angles through item_proj and
    out_proj (no bias); soft_token_scale multiplies the soft tokens, as SASRec's sqrt(d)."""
    torch.manual_seed(0)
    config = _config(*RANDOM_TINY["gpt2"], "model.projection_init=orthogonal", "model.soft_token_scale=8")
    model = build_model(config, NUM_USERS, NUM_ITEMS)
    embeddings = model.embeddings
    for projection in (embeddings.item_proj, embeddings.user_proj, model.out_proj):
        weight = projection.weight.detach()  # (out, in)
        narrow = min(weight.shape)
        gram = weight.T @ weight if weight.shape[0] >= weight.shape[1] else weight @ weight.T
        assert torch.allclose(gram, torch.eye(narrow), atol=1e-5)
        assert torch.all(projection.bias == 0)
    items = torch.tensor([[1, 5, 0]])
    rows = embeddings.item_embeddings(items)  # (1, 3, 16)
    tokens = embeddings.item_tokens(items)  # (1, 3, 32)
    assert torch.allclose(tokens.norm(dim=-1), 8 * rows.norm(dim=-1), atol=1e-5)
    assert torch.all(tokens[0, 2] == 0)  # padding stays exactly zero without a bias
    plain = build_model(_config(*RANDOM_TINY["gpt2"]), NUM_USERS, NUM_ITEMS)
    assert plain.embeddings.token_scale == 1.0 and plain.embeddings.item_proj.bias.abs().sum() > 0


def test_a_shared_user_token_is_one_start_token_for_every_user():
    torch.manual_seed(0)
    model = build_model(_config(*RANDOM_TINY["gpt2"], "model.share_user_token=true"), NUM_USERS, NUM_ITEMS).eval()
    items = torch.tensor([[3, 4, 5], [3, 4, 5]])
    with torch.no_grad():
        states = model(torch.tensor([1, 2]), items)  # (2, 4, d)
    assert torch.allclose(states[0], states[1], atol=1e-6)  # the user id does not reach the sequence
    # The user BPR still trains each user's own row.
    model.train()
    batch = make_batch(torch.Generator().manual_seed(0))
    model.calculate_loss(batch)["loss"].backward()
    rows = model.embeddings.user_embeddings.weight.grad  # (U+1, d)
    assert rows[batch["user_ids"].unique()].abs().sum() > 0


def test_a_tied_output_projection_scores_with_the_input_projection():
    """model.tie_output_projection: states are the backbone's output through item_proj's
    transpose, out_proj is unused and frozen, and the tied projection learns from both ends."""
    torch.manual_seed(0)
    model = build_model(_config(*RANDOM_TINY["gpt2"], "model.tie_output_projection=true"), NUM_USERS, NUM_ITEMS)
    model.eval()
    users, items = torch.tensor([1, 2]), torch.tensor([[3, 4, 5], [6, 7, 0]])
    with torch.no_grad():
        states = model(users, items)  # (2, 4, d)
        hidden = model.backbone(
            inputs_embeds=torch.cat(
                [model.embeddings.user_tokens(users)[:, None], model.embeddings.item_tokens(items)], dim=1
            ),
            attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
            position_ids=torch.tensor([[0, 1, 2, 3], [0, 1, 2, 2]]),
        ).last_hidden_state  # (2, 4, d_model)
    expected = hidden @ model.embeddings.item_proj.weight  # (2, 4, d)
    assert torch.allclose(states[0], expected[0], atol=1e-5)
    assert torch.allclose(states[1, :3], expected[1, :3], atol=1e-5)
    assert not model.out_proj.weight.requires_grad
    model.train()
    model.calculate_loss(make_batch(torch.Generator().manual_seed(0)))["loss"].backward()
    assert model.out_proj.weight.grad is None
    assert model.embeddings.item_proj.weight.grad.abs().sum() > 0


def test_frozen_projections_leave_the_learning_to_the_id_tables():
    """model.freeze_projections: no projection gets a gradient; the item table and the backbone do."""
    torch.manual_seed(0)
    model = build_model(_config(*RANDOM_TINY["gpt2"], "model.tie_output_projection=true",
                                "model.freeze_projections=true"), NUM_USERS, NUM_ITEMS)
    model.train()
    model.calculate_loss(make_batch(torch.Generator().manual_seed(0)))["loss"].backward()
    for proj in (model.embeddings.item_proj, model.embeddings.user_proj, model.out_proj):
        assert all(p.grad is None and not p.requires_grad for p in proj.parameters())
    assert model.embeddings.item_embeddings.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


@pytest.mark.parametrize("use_user_token", [True, False])
def test_attend_padding_is_a_left_padded_window_with_visible_padding(use_user_token):
    """model.attend_padding (SASRec's window): the same states whatever the input's padding,
    the last item always at the last slot, and still causal."""
    torch.manual_seed(0)
    config = _config(*RANDOM_TINY["gpt2"], "model.attend_padding=true",
                     f"model.use_user_token={str(use_user_token).lower()}")
    model = build_model(config, NUM_USERS, NUM_ITEMS).eval()
    offset = 1 if use_user_token else 0
    users = torch.tensor([1, 2])
    left, right = _padded_pair([[3, 4, 5], [7, 8, 9, 10, 11, 12]], SEQ_LEN)
    with torch.no_grad():
        a, b = model(users, left), model(users, right)  # (2, S, d) each in its own layout
        assert torch.allclose(a[0, offset + SEQ_LEN - 3:], b[0, offset:offset + 3], atol=1e-6)
        assert torch.allclose(model.user_state(users, left), model.user_state(users, right), atol=1e-6)
        assert torch.all(b[0, offset + 3:] == 0)  # padding positions carry no state
        # The padding is visible: the same items with a shorter window give other states.
        short = build_model(_config(*RANDOM_TINY["gpt2"], "model.attend_padding=true", "model.max_seq_len=4",
                                    f"model.use_user_token={str(use_user_token).lower()}"), NUM_USERS, NUM_ITEMS)
        short.load_state_dict(model.state_dict(), strict=False)
        assert not torch.allclose(short.eval()(users[:1], right[:1, :4]), b[:1, : offset + 4], atol=1e-4)
        changed = right.clone()
        changed[0, 2] = 19
        moved = (model(users, changed) - b)[0].abs().amax(dim=1)  # (S,)
        assert moved[: offset + 2].max() < 1e-6 and moved[offset + 2] > 1e-4


@pytest.mark.parametrize("mode", ["full", "sampled"])
def test_the_item_bias_is_added_to_every_score_and_learns(mode):
    """model.item_bias: every score is state . row + b_i, in the losses (full and sampled
    cross-entropy, context BPR), in full_sort_predict and in predict_candidates."""
    torch.manual_seed(0)
    config = _config(
        *RANDOM_TINY["gpt2"], "model.item_bias=true", f"stage_a.ce.mode={mode}", "stage_a.ce.num_sampled=8",
        "stage_a.collaborative.use_bpr_loss=true",
    )
    model = build_model(config, NUM_USERS, NUM_ITEMS)
    assert model.item_bias.shape == (NUM_ITEMS + 1,) and torch.all(model.item_bias == 0)
    batch = make_batch(torch.Generator().manual_seed(0))
    model.calculate_loss(batch)["loss"].backward()
    assert model.item_bias.grad[1:].abs().sum() > 0 and model.item_bias.grad[0] == 0  # padding never a class
    with torch.no_grad():
        model.item_bias.copy_(torch.linspace(-2.0, 2.0, NUM_ITEMS + 1))
    model.eval()
    users, seq = torch.tensor([1, 2]), torch.tensor([[3, 4, 5], [6, 7, 0]])
    scores = model.full_sort_predict(users, seq)
    plain = model.user_state(users, seq) @ model.embeddings.item_embeddings.weight.T
    assert torch.allclose(scores[:, 1:], (plain + model.item_bias)[:, 1:], atol=1e-5)
    assert torch.all(scores[:, 0] == float("-inf"))
    candidates = torch.tensor([[5, 1, 9], [2, 3, 4]])
    assert torch.allclose(model.predict_candidates(users, seq, candidates), scores.gather(1, candidates), atol=1e-5)
    if mode == "full":  # the loss is the cross-entropy of exactly these scores (no dropout in SHAPE)
        model.train()
        loss = model.calculate_loss(batch)["cross_entropy"]
        valid = batch["targets"] != 0
        states = model(batch["user_ids"], batch["item_seq"])[valid]  # (N, d)
        logits = states @ model.embeddings.item_embeddings.weight.T + model.item_bias  # (N, I+1)
        expected = torch.nn.functional.cross_entropy(logits[:, 1:], batch["targets"][valid] - 1)
        assert torch.allclose(loss, expected, atol=1e-5)


def test_the_item_bias_starts_at_the_centred_log_popularity_and_round_trips(tmp_path):
    config = _config(*RANDOM_TINY["gpt2"], "model.item_bias=true", "model.item_bias_init=log_popularity")
    model = build_model(config, NUM_USERS, NUM_ITEMS)
    counts = torch.arange(NUM_ITEMS + 1)
    model.init_item_bias(counts)
    expected = torch.log1p(counts.double())
    expected = expected - expected[1:].mean()
    assert torch.allclose(model.item_bias[1:].double(), expected[1:], atol=1e-6) and model.item_bias[0] == 0
    assert "item_bias" in model.trainable_state_dict()
    _round_trip(config, tmp_path)  # saved and reloaded with the rest of the weights
    with pytest.raises(ConfigError, match="needs model.item_bias: true"):
        _config("model.item_bias_init=log_popularity")


@pytest.mark.parametrize("use_user_token", [True, False])
def test_item_readings_mix_each_recent_item_read_alone_into_the_state(use_user_token):
    """``item_readings`` k: the state is (1 - w) x the history's + w x the mean state of its last
    k items each read as a one-item history; rows with fewer items use what they have, and left
    padding reads the same as right padding."""
    torch.manual_seed(0)
    model = build_model(_config(*RANDOM_TINY["gpt2"], f"model.use_user_token={str(use_user_token).lower()}"),
                        NUM_USERS, NUM_ITEMS).eval()
    users = torch.tensor([1, 2, 3])
    right = torch.tensor([[4, 5, 6, 7, 8], [9, 3, 0, 0, 0], [11, 0, 0, 0, 0]])
    left = torch.tensor([[4, 5, 6, 7, 8], [0, 0, 0, 9, 3], [0, 0, 0, 0, 11]])
    with torch.no_grad():
        plain = model.user_state(users, right)
        model.item_readings, model.item_readings_weight = 3, 0.25
        mixed = model.user_state(users, right)
        assert torch.allclose(model.user_state(users, left), mixed, atol=1e-6)
        model.item_readings = 0
        assert torch.equal(model.user_state(users, right), plain)  # off: the history alone
        alone = lambda user, item: model.user_state(torch.tensor([user]), torch.tensor([[item]]))[0]  # noqa: E731
        expected = [
            0.75 * plain[0] + 0.25 * (alone(1, 6) + alone(1, 7) + alone(1, 8)) / 3,  # the last 3 of 5
            0.75 * plain[1] + 0.25 * (alone(2, 9) + alone(2, 3)) / 2,  # both of 2
            0.75 * plain[2] + 0.25 * alone(3, 11),  # a one-item history: its own state
        ]
    assert torch.allclose(mixed, torch.stack(expected), atol=1e-5)
    assert torch.allclose(mixed[2], plain[2], atol=1e-5)
    # Scores are linear in the state: full_sort_predict ranks with the mixed state.
    model.item_readings = 3
    with torch.no_grad():
        scores = model.full_sort_predict(users, right)
    assert torch.allclose(scores[:, 1:], (mixed @ model.scoring_table().float().T)[:, 1:], atol=1e-5)
