"""Loss functions of the Stage A model, against hand-computed or unchunked references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llm_recommender.config import load_config
from llm_recommender.errors import ConfigError
from llm_recommender.models.stage_a_model import (
    StageAModel,
    bpr_loss,
    chunk_positions,
    chunked_cross_entropy,
    future_soft_targets,
    info_nce,
    tied_soft_targets,
    sample_negatives,
    sampled_softmax_cross_entropy,
)


def _reference_ce(states, weight, targets, label_smoothing=0.0):
    logits = states @ weight.T  # (N, I+1)
    # Padding column 0 is not a class: smooth over items 1..I only.
    return F.cross_entropy(logits[:, 1:], targets - 1, label_smoothing=label_smoothing)


@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: logits beyond exp's safe range, max-subtracted
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
def test_chunked_cross_entropy_equals_unchunked_with_gradients(chunk_size, label_smoothing, scale):
    generator = torch.Generator().manual_seed(0)
    num_positions, dim, num_items = 13, 8, 50
    states = scale * torch.randn(num_positions, dim, generator=generator, dtype=torch.float64).float()
    weight = torch.randn(num_items + 1, dim, generator=generator)
    targets = torch.randint(1, num_items + 1, (num_positions,), generator=generator)

    s1, w1 = states.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = chunked_cross_entropy(s1, w1, targets, chunk_size, label_smoothing)
    loss.backward()
    s2, w2 = states.clone().requires_grad_(), weight.clone().requires_grad_()
    reference = _reference_ce(s2, w2, targets, label_smoothing)
    reference.backward()

    assert abs(loss.item() - reference.item()) <= 1e-6 * max(1.0, abs(reference.item()))
    # fp32 rounding grows with the logits: 1e-6 at unit scale, 1e-5 of the largest entry beyond.
    for ours, theirs in ((s1.grad, s2.grad), (w1.grad, w2.grad)):
        assert (ours - theirs).abs().max() <= 1e-6 + 1e-5 * theirs.abs().max()
    assert torch.all(w1.grad[0] == 0), "the padding row gets no gradient"


def test_future_soft_targets_share_mass_with_the_later_targets_of_the_row():
    targets = torch.tensor([[5, 6, 7, 0], [8, 8, 0, 0]])  # (B, S), 0 = no target
    ids, weights = future_soft_targets(targets, count=2, weight=0.3)
    assert ids[0, 0].tolist() == [5, 6, 7] and weights[0, 0].tolist() == pytest.approx([0.7, 0.15, 0.15])
    assert ids[0, 1].tolist() == [6, 7, 0] and weights[0, 1].tolist() == pytest.approx([0.7, 0.3, 0.0])
    assert weights[0, 2].tolist() == pytest.approx([1.0, 0.0, 0.0]), "the last target keeps all its mass"
    assert ids[1, 0].tolist() == [8, 8, 0] and weights[1, 0].tolist() == pytest.approx([0.7, 0.3, 0.0])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk_size", [3, 1000])
def test_chunked_cross_entropy_with_soft_targets_equals_unchunked(chunk_size, label_smoothing):
    """Soft targets (a repeated id included) against F.cross_entropy with probabilities."""
    generator = torch.Generator().manual_seed(5)
    num_positions, dim, num_items = 11, 8, 30
    states = torch.randn(num_positions, dim, generator=generator)
    weight = torch.randn(num_items + 1, dim, generator=generator)
    ids = torch.randint(1, num_items + 1, (num_positions, 3), generator=generator)
    ids[0, 1] = ids[0, 0]  # the same item twice: its shares add up
    ids[1, 2] = 0  # a missing later target holds id 0 with weight 0
    shares = torch.rand(num_positions, 3, generator=generator)
    shares[1, 2] = 0.0
    shares = shares / shares.sum(1, keepdim=True)

    s1, w1 = states.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = chunked_cross_entropy(s1, w1, ids, chunk_size, label_smoothing, shares)
    loss.backward()
    s2, w2 = states.clone().requires_grad_(), weight.clone().requires_grad_()
    probabilities = torch.zeros(num_positions, num_items + 1).scatter_add_(1, ids, shares)[:, 1:]
    reference = F.cross_entropy((s2 @ w2.T)[:, 1:], probabilities, label_smoothing=label_smoothing)
    reference.backward()

    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    for ours, theirs in ((s1.grad, s2.grad), (w1.grad, w2.grad)):
        assert (ours - theirs).abs().max() <= 1e-5
    assert torch.all(w1.grad[0] == 0), "the padding row gets no gradient"


def test_tied_soft_targets_split_mass_over_the_rest_of_the_run():
    targets = torch.tensor([[5, 6, 7, 8, 0], [9, 4, 0, 0, 0]])  # (B, S), 0 = no target
    groups = torch.tensor([[1, 2, 2, 2, 0], [3, 4, 0, 0, 0]])  # 6, 7, 8 share a timestamp
    ids, weights = tied_soft_targets(targets, groups)
    assert ids.shape == (2, 5, 3)
    assert weights[0, 0].tolist() == pytest.approx([1.0, 0.0, 0.0]), "an untied target keeps its mass"
    assert ids[0, 1].tolist() == [6, 7, 8] and weights[0, 1].tolist() == pytest.approx([1 / 3] * 3)
    assert ids[0, 2, :2].tolist() == [7, 8] and weights[0, 2].tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert weights[0, 3].tolist() == pytest.approx([1.0, 0.0, 0.0]), "the run's last event is its own target"
    assert weights[0, 4].sum() == 0 and weights[1, 2:].sum() == 0, "padding has no target"
    assert weights[1, :2].flatten().tolist() == pytest.approx([1.0, 0.0, 0.0] * 2)
    plain_ids, plain_weights = tied_soft_targets(targets, torch.arange(1, 11).view(2, 5) * (targets != 0))
    assert plain_ids.shape == (2, 5, 1), "no ties: the plain targets"


def test_tied_targets_loss_is_the_mean_over_the_runs_orders():
    """stage_a.ce.tied_targets: the loss of one order of a run equals the average, over the
    run's orders, of the plain next-item loss of the positions whose input is the same."""
    from llm_recommender.models.stage_a_model import build_model

    config = load_config(None, [
        "model.base_llm=gpt2", "model.random_init_stage_a_llm=true", "model.num_layers=1",
        "model.hidden_size=16", "model.num_heads=2", "model.intermediate_size=32", "model.embedding_dim=16",
        "model.max_seq_len=10", "model.dropout=0.0", "model.embedding_dropout=0.0", "model.use_user_token=false",
        "stage_a.collaborative.use_bpr_loss=false", "stage_a.ce.tied_targets=true",
    ])
    torch.manual_seed(0)
    model = build_model(config, num_users=3, num_items=12).eval()
    # Input 3 then a run {5, 6, 7} (order unknown): positions 1.. predict the run's members.
    batch = {"user_ids": torch.tensor([1]), "item_seq": torch.tensor([[3, 5, 6]]),
             "targets": torch.tensor([[5, 6, 7]]), "target_groups": torch.tensor([[2, 2, 2]])}
    tied = model.calculate_loss(batch)["cross_entropy"]
    with torch.no_grad():
        states = model(batch["user_ids"], batch["item_seq"])[0]  # (S, d)
        log_probs = torch.log_softmax(states @ model.scoring_table()[1:].T, dim=-1)  # (S, I)
    expected = (-(log_probs[0, [4, 5, 6]].mean()) - log_probs[1, [5, 6]].mean() - log_probs[2, 6]) / 3
    assert float(tied) == pytest.approx(float(expected), rel=1e-5)
    plain = model.calculate_loss({k: v for k, v in batch.items() if k != "target_groups"})["cross_entropy"]
    assert float(plain) != pytest.approx(float(tied), rel=1e-3)


def test_tied_targets_need_full_softmax_without_future_targets():
    with pytest.raises(ConfigError, match="stage_a.ce.tied_targets"):
        load_config(None, ["stage_a.ce.tied_targets=true", "stage_a.ce.mode=sampled"])
    with pytest.raises(ConfigError, match="stage_a.ce.tied_targets"):
        load_config(None, ["stage_a.ce.tied_targets=true", "stage_a.ce.future_targets=1", "stage_a.ce.future_weight=0.2"])


def test_future_weight_needs_future_targets_and_full_softmax():
    with pytest.raises(ConfigError, match="stage_a.ce.future_weight"):
        load_config(None, ["stage_a.ce.future_weight=0.2"])
    with pytest.raises(ConfigError, match="stage_a.ce.future_weight"):
        load_config(None, ["stage_a.ce.future_weight=0.2", "stage_a.ce.future_targets=1", "stage_a.ce.mode=sampled"])


@pytest.mark.parametrize("chunk_size", [4, 1000])
def test_chunked_cross_entropy_calls_in_flight_share_no_buffer(chunk_size):
    """Two losses computed before either backward (the logits workspace is leased to the
    first): each gets the gradients it gets alone."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(41, 8, generator=generator)
    batches = [(torch.randn(9, 8, generator=generator), torch.randint(1, 41, (9,), generator=generator))
               for _ in range(2)]

    def grads(together: bool):
        leaves = [(s.clone().requires_grad_(), weight.clone().requires_grad_()) for s, _ in batches]
        losses = []
        for (s, w), (_, targets) in zip(leaves, batches):
            losses.append(chunked_cross_entropy(s, w, targets, chunk_size))
            if not together:
                losses[-1].backward()
        if together:
            losses[1].backward()
            losses[0].backward()
        return [(s.grad, w.grad) for s, w in leaves]

    for (s_alone, w_alone), (s_both, w_both) in zip(grads(False), grads(True)):
        assert torch.equal(s_alone, s_both) and torch.equal(w_alone, w_both)


def test_chunk_positions_fit_the_memory_budget():
    # 349K items, 1 GiB: two fp32 (c x 349,001) buffers fit in 1 GiB at c = 384.
    assert chunk_positions(349_000, 4096, 1024.0) == 384
    assert chunk_positions(100, 4096, 1024.0) == 4096  # small catalogue: chunk_size rules
    assert chunk_positions(10**9, 4096, 1.0) == 1  # never zero


def test_sampled_softmax_with_every_item_and_uniform_q_equals_full_cross_entropy():
    generator = torch.Generator().manual_seed(1)
    num_positions, dim, num_items = 9, 6, 12
    states = torch.randn(num_positions, dim, generator=generator)
    weight = torch.randn(num_items + 1, dim, generator=generator)
    targets = torch.randint(1, num_items + 1, (num_positions,), generator=generator)
    negatives = torch.arange(1, num_items + 1)  # every item, the positive among them
    log_q = torch.full((num_items + 1,), -math.log(num_items))

    s1, w1 = states.clone().requires_grad_(), weight.clone().requires_grad_()
    sampled = sampled_softmax_cross_entropy(
        s1, w1[targets], w1[negatives], targets, negatives, log_q[targets], log_q[negatives]
    )
    sampled.backward()
    s2, w2 = states.clone().requires_grad_(), weight.clone().requires_grad_()
    full = _reference_ce(s2, w2, targets)
    full.backward()
    assert abs(sampled.item() - full.item()) < 1e-6
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6)
    assert torch.allclose(w1.grad, w2.grad, atol=1e-6)


def test_sampled_softmax_log_q_correction_and_accidental_hits_by_hand():
    states = torch.tensor([[1.0, 0.0]])
    items = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.5, 0.0]])  # rows 0..3
    targets = torch.tensor([1])
    negatives = torch.tensor([1, 2, 3])  # item 1 is the positive: masked
    log_q = torch.log(torch.tensor([0.0, 0.5, 0.25, 0.25]))
    loss = sampled_softmax_cross_entropy(
        states, items[targets], items[negatives], targets, negatives, log_q[targets], log_q[negatives]
    )
    pos = 2.0 - math.log(0.5)
    negs = [1.0 - math.log(0.25), 0.5 - math.log(0.25)]
    expected = -pos + math.log(math.exp(pos) + sum(math.exp(n) for n in negs))
    assert abs(loss.item() - expected) < 1e-6
    # Without correction: plain logits.
    plain = sampled_softmax_cross_entropy(states, items[targets], items[negatives], targets, negatives)
    expected_plain = -2.0 + math.log(math.exp(2.0) + math.exp(1.0) + math.exp(0.5))
    assert abs(plain.item() - expected_plain) < 1e-6


def test_negative_never_equals_positive_on_a_three_item_catalogue():
    torch.manual_seed(0)
    positives = torch.tensor([1, 2, 3] * 200)
    negatives = sample_negatives(positives, num_items=3, num_negatives=8)  # (600, 8)
    assert negatives.shape == (600, 8)
    assert not torch.any(negatives == positives[:, None])
    assert negatives.min() >= 1 and negatives.max() <= 3
    # Uniform over the two other items: each about half of 1600 draws.
    for item in (1, 2, 3):
        others = negatives[positives == item]
        for other in {1, 2, 3} - {item}:
            share = (others == other).float().mean().item()
            assert 0.44 < share < 0.56


def test_negative_sampling_needs_two_items():
    with pytest.raises(ConfigError, match="use_bpr_loss"):
        sample_negatives(torch.tensor([1]), num_items=1, num_negatives=2)


def test_bpr_loss_by_hand():
    query = torch.tensor([[1.0, 0.0]])
    positive = torch.tensor([[2.0, 0.0]])
    negatives = torch.tensor([[[1.0, 0.0], [3.0, 0.0]]])
    expected = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(1.0)))) / 2
    assert abs(bpr_loss(query, positive, negatives).item() - expected) < 1e-6


def _tiny_model(overrides):
    config = load_config(
        None,
        [
            "model.random_init_stage_a_llm=true",
            "model.base_llm=gpt2",
            "model.num_layers=1",
            "model.hidden_size=16",
            "model.num_heads=2",
            "model.embedding_dim=8",
            "model.max_seq_len=4",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    return StageAModel(config, num_users=3, num_items=4)


def test_popularity_proposal_draws_by_counts():
    model = _tiny_model(["stage_a.ce.mode=sampled"])
    model.set_item_sampling_distribution(torch.tensor([0, 97, 1, 1, 0]))  # item 4: raised to 1
    assert torch.allclose(model.sampling_log_q[1:].exp(), torch.tensor([0.97, 0.01, 0.01, 0.01]))
    torch.manual_seed(0)
    draws = model._draw_shared_negatives(20000)
    assert draws.min() >= 1
    assert 0.96 < (draws == 1).float().mean().item() < 0.98


def test_sparse_tables_need_sampled_cross_entropy():
    with pytest.raises(ConfigError, match="stage_a.ce.mode: sampled"):
        _tiny_model(["embeddings.sparse=true"])
    model = _tiny_model(["embeddings.sparse=true", "stage_a.ce.mode=sampled", "stage_a.ce.num_sampled=3"])
    batch = {
        "user_ids": torch.tensor([1, 2]),
        "item_seq": torch.tensor([[1, 2, 0, 0], [3, 4, 1, 0]]),
        "targets": torch.tensor([[1, 2, 3, 0, 0], [3, 4, 1, 2, 0]]),
    }
    model.calculate_loss(batch)["loss"].backward()
    assert model.embeddings.item_embeddings.weight.grad.is_sparse
    assert model.embeddings.user_embeddings.weight.grad.is_sparse


def test_l2_term_is_the_spec_formula_over_the_whole_tables():
    """L_reg = lambda_c * (||E_user||^2 + ||E_item||^2), weighted by loss_weights.regularization:
    every row of both tables, not only the batch's, and no division by the batch size."""
    model = _tiny_model(["stage_a.collaborative.use_bpr_loss=false", "embeddings.lambda_c=0.5",
                         "stage_a.loss_weights.regularization=2.0"])
    batch = {
        "user_ids": torch.tensor([1, 1]),
        "item_seq": torch.tensor([[1, 2, 0, 0], [2, 0, 0, 0]]),
        "targets": torch.tensor([[1, 2, 3, 0, 0], [2, 3, 0, 0, 0]]),
    }
    out = model.calculate_loss(batch)
    users = model.embeddings.user_embeddings.weight.detach()  # (U+1, d): 4 rows
    items = model.embeddings.item_embeddings.weight.detach()  # (I+1, d): 5 rows, row 0 zero
    by_hand = sum(float(v) ** 2 for v in users.flatten()) + sum(float(v) ** 2 for v in items.flatten())
    assert abs(out["l2"].item() - by_hand) < 1e-5
    assert abs(out["loss"].item() - (out["cross_entropy"].item() + 2.0 * 0.5 * by_hand)) < 1e-4
    assert out["context_bpr"].item() == 0.0 and out["user_bpr"].item() == 0.0
    out["loss"].backward()
    # Rows no batch touches (user 3, item 4) are regularised too: d(lambda_c * reg * |e|^2) = 2 * 1.0 * e.
    grad_user3 = model.embeddings.user_embeddings.weight.grad[3]
    assert torch.allclose(grad_user3, 2.0 * users[3], atol=1e-6)


def test_regularization_weight_zero_adds_nothing():
    model = _tiny_model(["stage_a.collaborative.use_bpr_loss=false", "embeddings.lambda_c=0.5"])
    batch = {
        "user_ids": torch.tensor([1]),
        "item_seq": torch.tensor([[1, 2, 0, 0]]),
        "targets": torch.tensor([[1, 2, 3, 0, 0]]),
    }
    out = model.calculate_loss(batch)  # the spec's default: regularization 0
    assert out["l2"].item() == 0.0 and out["loss"].item() == out["cross_entropy"].item()


@pytest.mark.parametrize(
    "weights, expected",
    [
        ([], (1.0, 1.0)),  # the spec: L_bpr = L_context + L_user, cf_bpr 1
        (["stage_a.loss_weights.cf_bpr=0.5"], (0.5, 0.5)),
        (["stage_a.loss_weights.user_bpr=0"], (1.0, 0.0)),  # the context term alone
        (["stage_a.loss_weights.cf_bpr=2", "stage_a.loss_weights.context_bpr=0.25"], (0.5, 2.0)),
    ],
)
def test_bpr_weights_are_cf_bpr_times_the_relative_weights(weights, expected):
    model = _tiny_model(["stage_a.collaborative.negative_samples=2", "stage_a.loss_weights.collaborative=3",
                         *weights])
    batch = {
        "user_ids": torch.tensor([1, 2]),
        "item_seq": torch.tensor([[1, 2, 0, 0], [3, 4, 1, 0]]),
        "targets": torch.tensor([[1, 2, 3, 0, 0], [3, 4, 1, 2, 0]]),
    }
    torch.manual_seed(0)
    out = model.calculate_loss(batch)
    context_weight, user_weight = expected
    assert (out["user_bpr"].item() > 0) == (user_weight > 0)
    total = 3 * out["cross_entropy"] + context_weight * out["context_bpr"] + user_weight * out["user_bpr"]
    assert abs(out["loss"].item() - total.item()) < 1e-5


def test_cf_bpr_zero_with_a_relative_weight_is_a_contradiction():
    with pytest.raises(ConfigError, match="cf_bpr=0 switches L_bpr off"):
        _tiny_model(["stage_a.loss_weights.cf_bpr=0", "stage_a.loss_weights.context_bpr=0.5"])


def test_sparse_tables_refuse_the_whole_table_regulariser():
    with pytest.raises(ConfigError, match="regularization"):
        _tiny_model(["embeddings.sparse=true", "stage_a.ce.mode=sampled", "stage_a.loss_weights.regularization=1"])


def test_info_nce_by_hand():
    """Each state must find its partner (the same row of the other tensor) among the others."""
    first = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    second = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    states = torch.cat([first, second])  # a, b, a', b'
    logits = states @ states.T / 0.5
    logits.fill_diagonal_(float("-inf"))
    by_hand = F.cross_entropy(logits, torch.tensor([2, 3, 0, 1]))
    assert torch.allclose(info_nce(first, second, 0.5), by_hand)
    far = torch.tensor([[30.0, 0.0], [0.0, 30.0]])  # well separated pairs: the loss goes to 0
    assert info_nce(far, far.clone(), 1.0).item() < 1e-6
    assert info_nce(first[:1], second[:1], 1.0).item() == 0.0  # one row: nothing to contrast
    # Cosine: the dot product of the normalised states, whatever their norms.
    assert torch.allclose(info_nce(first, second, 0.5, cosine=True),
                          info_nce(F.normalize(first, dim=1), 7 * F.normalize(second, dim=1) / 7, 0.5))
    assert torch.allclose(info_nce(3 * first, 0.1 * second, 0.2, cosine=True), info_nce(first, second, 0.2, cosine=True))


@pytest.mark.parametrize("user_token", [False, True])
def test_last_input_state_is_the_one_that_predicts_the_last_target(user_token):
    model = _tiny_model([f"model.use_user_token={str(user_token).lower()}"])
    item_seq = torch.tensor([[1, 2, 0], [3, 0, 0]])
    states = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)[:, : 3 + user_token]
    last = model._last_input_states(states, item_seq)[:, 0]
    assert last.tolist() == ([2.0, 5.0] if user_token else [1.0, 4.0])


def test_contrastive_term_trains_only_and_costs_a_second_pass():
    """stage_a.loss_weights.contrastive: a second forward pass with new dropout in training,
    added with its weight; evaluation never pays it and weight 0 is the plain loss."""
    batch = {
        "user_ids": torch.tensor([1, 2, 3]),
        "item_seq": torch.tensor([[1, 2, 0, 0], [3, 4, 1, 0], [2, 3, 0, 0]]),
        "targets": torch.tensor([[1, 2, 3, 0, 0], [3, 4, 1, 2, 0], [2, 3, 4, 0, 0]]),
    }
    model = _tiny_model(["stage_a.collaborative.use_bpr_loss=false", "model.dropout=0.3",
                         "stage_a.loss_weights.contrastive=0.5", "stage_a.contrastive_temperature=2"])
    calls = []
    model.backbone.register_forward_hook(lambda *_: calls.append(1))
    model.train()
    out = model.calculate_loss(batch)
    assert len(calls) == 2 and out["contrastive"].item() > 0
    assert abs(out["loss"].item() - (out["cross_entropy"].item() + 0.5 * out["contrastive"].item())) < 1e-5
    out["loss"].backward()
    model.eval()
    calls.clear()
    out = model.calculate_loss(batch)
    assert len(calls) == 1 and out["contrastive"].item() == 0.0
    plain = _tiny_model(["stage_a.collaborative.use_bpr_loss=false"])
    plain.train()
    calls.clear()
    plain.backbone.register_forward_hook(lambda *_: calls.append(1))
    assert plain.calculate_loss(batch)["contrastive"].item() == 0.0 and len(calls) == 1


@pytest.mark.parametrize("key, value", [("stage_a.contrastive_temperature", "0"),
                                        ("stage_a.loss_weights.contrastive", "-0.1")])
def test_contrastive_settings_are_checked(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [f"{key}={value}"])
