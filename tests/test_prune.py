"""E²VPT pruning: both scorings (``authors``: trained gates, mean signed gradient, cap 12/16, fresh
rewind; ``ours``: |gradient| at gate 1 from the prompts, exact rewind), real token removal, fixed masks."""

from __future__ import annotations

import math

import pytest
import torch

from vpt_tune.condense import condense_
from vpt_tune.cost import ViTShape, prompted_cost
from vpt_tune.data.demo import materialise
from vpt_tune.models.placement import prompt_counts
from vpt_tune.models.prompted_vit import PromptedViT
from vpt_tune.prune import (
    MAX_PRUNED_SEGMENTS, SEGMENTS, GateScores, gate_importance, masked_entries, prune_, select_gates, segment_of,
)
from vpt_tune import prune as prune_module
from vpt_tune.train import job as job_module
from vpt_tune.train.job import Job, expected_cost, run
from vpt_tune.train.loop import TrainConfig, train
from vpt_tune.train.prefix_cache import TokenSplit

CPU = torch.device("cpu")


def _deep(make_vit, prompts=4, seed=0, gated=False):
    torch.manual_seed(seed)
    return PromptedViT(make_vit(), 2, prompt_counts(prompts, "deep", 4), gated=gated).eval()


def _float64(split) -> TokenSplit:
    """``split``'s normalised images in float64, batched the same way (a TokenSplit holds any inputs)."""
    return TokenSplit(split.inputs(torch.arange(len(split))).double(), split.labels)


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory):
    """The demo digits task with 64-image train and eval lists: a whole job in seconds."""
    task = materialise("digits", tmp_path_factory.mktemp("demo"))
    for small, full in (("train64", "train800"), ("val64", "val200")):
        lines = (task / f"{full}.txt").read_text().splitlines()[:64]
        (task / f"{small}.txt").write_text("\n".join(lines) + "\n")
    return str(task)


def _job(task_dir: str, scoring: str, segment_ratio: float) -> Job:
    return Job(
        model="vit_tiny_patch16_224", weights="random", img_size=32, task_dir=task_dir, train_split="train64",
        eval_split="val64", epochs=1, batch_size=32, method="e2vpt",
        options={"e2vpt": {"prune_epochs": 1, "prune_scoring": scoring}},
        params={"num_prompts": 4, "placement": "deep", "kv_prompts": 1, "base_lr": 1.0, "token_prune_ratio": 0.5,
                "segment_prune_ratio": segment_ratio},
    )


def _record_train_starts(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """The trainable state at the start of every training phase of ``run``."""
    starts, real_train = [], job_module.train

    def recording_train(net, *args, **kwargs):
        starts.append(getattr(net, "model", net).trainable_state())  # a prefix-cached wrapper or the model
        return real_train(net, *args, **kwargs)

    monkeypatch.setattr(job_module, "train", recording_train)
    return starts


# ---------------------------------------------------------------- ours


def test_gate_scores_equal_the_gradients_of_explicit_gates(make_vit, two_class_splits):
    """``ours``: the gradients of real gates at 1, one token gate and one (T, 16) segment gate shared by all blocks."""
    # float64: the two sides sum the same products in different orders (per block, then over the gate's
    # entries, against autograd's order through the gates); in float32 scores of ~1e-6 then differ by ~1e-2
    # relative between CPUs, in float64 by ~1e-12, so the comparison checks the formula, not the rounding.
    model = _deep(make_vit).double()
    split = _float64(two_class_splits(8, 0))  # one batch: the mean of |grad| is |grad|
    scores = gate_importance(model, model, split, 8, CPU)
    assert scores.tokens.dtype == scores.segments.dtype == torch.float64

    token_gate = torch.ones(4, dtype=torch.float64, requires_grad=True)
    segment_gate = torch.ones(4, SEGMENTS, dtype=torch.float64, requires_grad=True)
    dims = segment_of(model.prompts.embed_dim)
    plain = model.prompts.forward
    model.prompts.forward = lambda block, batch: plain(block, batch) * token_gate[:, None] * segment_gate[:, dims]
    images, labels = next(split.batches(8))
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    assert torch.allclose(scores.tokens, token_gate.grad.abs(), rtol=1e-9, atol=1e-20)
    assert torch.allclose(scores.segments, segment_gate.grad.abs(), rtol=1e-9, atol=1e-20)


def test_the_prompt_that_carries_the_signal_is_kept(make_vit, two_class_splits):
    model = _deep(make_vit)
    with torch.no_grad():
        for tokens in model.prompts.tokens.values():
            tokens.zero_()
        model.prompts.tokens["2"][3].normal_()  # only prompt index 3 (in one block) can matter
    scores = gate_importance(model, model, two_class_splits(16, 0), 8, CPU)
    assert scores.tokens[3] > 0 and scores.tokens[:3].sum() == 0
    kept, _ = select_gates(scores, token_ratio=0.75, segment_ratio=0.0)
    assert kept == [3]


def test_select_gates_counts_and_segments():
    scores = GateScores(torch.tensor([3.0, 1.0, 2.0, 0.5]), torch.arange(4 * SEGMENTS, dtype=torch.float).view(4, -1))
    kept, segments = select_gates(scores, token_ratio=0.5, segment_ratio=0.25)
    assert kept == [0, 2]  # the two best tokens, in index order
    assert segments.shape == (2, SEGMENTS)
    assert (segments.sum(dim=1) == SEGMENTS - 4).all()  # floor(0.25 * 16) pruned per token
    assert (segments[:, :4] == 0).all()  # the least important segments (lowest scores) go
    assert select_gates(scores, 0.0, 0.0)[0] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="token prune ratio"):
        select_gates(scores, 1.0, 0.0)
    ten = GateScores(torch.arange(10.0), torch.zeros(10, SEGMENTS))
    assert len(select_gates(ten, 0.7, 0.0)[0]) == 3  # 10 · 0.7 prunes 7, though (1 - 0.7) · 10 > 3 in floats


def test_pruned_model_removes_tokens_lowers_cost_and_equals_masked_reference(make_vit, images, record_blocks):
    model = _deep(make_vit)
    full = {i: t.detach().clone() for i, t in model.prompts.tokens.items()}
    kept = [1, 3]
    segments = torch.ones(2, SEGMENTS)
    segments[0, [0, 5]] = 0
    segments[1, 7] = 0
    prune_(model, kept, segments)

    assert model.prompts.counts == [2, 2, 2, 2]
    with record_blocks(model.backbone) as rec:
        pruned_logits = model(images)
    prefix, patches = model.backbone.num_prefix_tokens, model.backbone.patch_embed.num_patches
    assert rec.lengths() == [prefix + 2 + patches] * 4  # really removed from the sequence
    shape = ViTShape.of(model.backbone)
    assert prompted_cost(shape, model.prompts.counts).gflops < prompted_cost(shape, prompt_counts(4, "deep", 4)).gflops

    # Reference: the full model with the pruned tokens gone and the pruned segments zeroed.
    dims = segment_of(model.prompts.embed_dim)
    reference = _deep(make_vit)
    condense_(reference, {b: kept for b in range(4)})
    with torch.no_grad():
        for i, tokens in reference.prompts.tokens.items():
            tokens.copy_(full[i][kept] * segments[:, dims])
        reference.head.load_state_dict(model.head.state_dict())
    assert torch.allclose(pruned_logits, reference(images), atol=1e-5)
    width = model.prompts.embed_dim
    assert masked_entries(model) == 4 * sum(width // SEGMENTS + (d < width % SEGMENTS) for d in (0, 5, 7))


def test_masked_entries_stay_zero_through_training_and_are_saved(make_vit, two_class_splits):
    model = _deep(make_vit)
    segments = torch.ones(4, SEGMENTS)
    segments[:, :8] = 0
    prune_(model, [0, 1, 2, 3], segments)
    split = two_class_splits(16, 0)
    train(model, split, split, TrainConfig(epochs=2, batch_size=8, base_lr=10.0, weight_decay=0.01), CPU)
    dims = segment_of(model.prompts.embed_dim)
    for tokens in model.prompts.tokens.values():
        assert (tokens[:, dims < 8] == 0).all() and (tokens[:, dims >= 8] != 0).any()
    state = model.trainable_state()
    assert "prompts.masks.0" in state and not any(k.startswith("backbone.") for k in state)


def test_pruning_needs_equal_counts(make_vit, two_class_splits):
    torch.manual_seed(0)
    model = PromptedViT(make_vit(), 2, [3, 2, 0, 0])
    with pytest.raises(ValueError, match="same prompt count"):
        gate_importance(model, model, two_class_splits(8, 0), 8, CPU)
    with pytest.raises(ValueError, match="same prompt count"):
        PromptedViT(make_vit(), 2, [3, 2, 0, 0], gated=True)


def test_ours_job_prunes_rewinds_to_the_initial_values_and_retrains(small_digits, monkeypatch):
    """``ours``: phase 2 starts from the initial values of the kept prompts (rewind), not from the trained ones."""
    starts = _record_train_starts(monkeypatch)
    job = _job(small_digits, "ours", segment_ratio=0.5)
    epochs = []
    model, metrics = run(job, CPU, on_epoch=lambda epoch, m, _: epochs.append(epoch))
    assert epochs == [0, 1] and job.total_epochs == 2
    assert "val_acc_unpruned" in metrics
    assert sum(model.prompts.counts) == 2 * 12
    initial, retrained_from = starts
    assert "prompts.token_gate" not in initial  # no gates train with ours
    for block in model.prompts.tokens:  # every kept row = its initial value, masked
        mask = model.prompts.mask(int(block))
        for j, row in enumerate(retrained_from[f"prompts.tokens.{block}"]):
            assert any(torch.equal(initial[f"prompts.tokens.{block}"][i] * mask[j], row) for i in range(4)), (block, j)
    assert (mask[:, :SEGMENTS].sum(dim=1) == SEGMENTS - 8).all()  # floor(0.5 · 16), no cap
    cost = expected_cost(job)  # known before training: token pruning keeps exactly 2 of 4 in every block
    assert metrics["prompt_tokens"] == pytest.approx(2) == cost.prompt_tokens
    assert metrics["gflops"] == pytest.approx(cost.gflops, rel=1e-12)
    assert metrics["trainable_params"] < cost.trainable_params  # masked segments are not trainable
    assert math.isfinite(metrics["val_acc"])


# ---------------------------------------------------------------- authors


def test_authors_gates_multiply_the_prompts_in_every_block_and_train(make_vit, two_class_splits, images):
    model = _deep(make_vit, gated=True)
    prompts = model.prompts
    assert torch.equal(prompts.token_gate, torch.ones(4)) and torch.equal(prompts.segment_gate, torch.ones(4, 16))
    assert {"prompts.token_gate", "prompts.segment_gate"} <= {n for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        prompts.token_gate.uniform_(0.5, 1.5)
        prompts.segment_gate.uniform_(0.5, 1.5)
    reference = _deep(make_vit)  # the same prompts and head, no gates: multiply the gates in by hand
    dims = segment_of(prompts.embed_dim)
    with torch.no_grad():
        for tokens in reference.prompts.tokens.values():
            tokens.mul_(prompts.token_gate[:, None] * prompts.segment_gate[:, dims])
    assert torch.equal(model(images), reference(images))  # the same products in the same order

    before = {name: t.detach().clone() for name, t in model.named_parameters() if "gate" in name}
    split = two_class_splits(16, 0)
    train(model, split, split, TrainConfig(epochs=2, batch_size=8, base_lr=10.0, weight_decay=0.0), CPU)
    for name, tensor in before.items():
        assert not torch.equal(tensor, model.state_dict()[name]), name  # trained with the prompts
    assert set(before) <= set(model.trainable_state())  # saved with them


def test_authors_scores_are_the_mean_signed_gradient_at_the_trained_gates(make_vit, two_class_splits):
    model = _deep(make_vit, gated=True).double()
    gates = [model.prompts.token_gate, model.prompts.segment_gate]
    with torch.no_grad():  # trained gates are not 1
        for gate in gates:
            gate.uniform_(0.5, 1.5)
    split = _float64(two_class_splits(16, 0))
    scores = gate_importance(model, model, split, 8, CPU)
    total = [torch.zeros_like(gate) for gate in gates]
    for inputs, labels in split.batches(8):  # two batches
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        for sum_, grad in zip(total, torch.autograd.grad(loss, gates)):
            sum_ += grad
    assert torch.allclose(scores.tokens, total[0] / 2, rtol=1e-12, atol=0)  # float64, the same sums in the same order
    assert torch.allclose(scores.segments, total[1] / 2, rtol=1e-12, atol=0)
    assert (scores.segments < 0).any() and (scores.segments > 0).any()  # signed, not magnitudes


def test_authors_prune_the_most_negative_scores():
    signed = torch.arange(SEGMENTS, dtype=torch.float) - 8  # -8 .. 7: the smallest magnitudes are in the middle
    scores = GateScores(torch.tensor([-3.0, 1.0, -0.5, 2.0]), signed.repeat(4, 1))
    kept, segments = select_gates(scores, token_ratio=0.5, segment_ratio=0.25)
    assert kept == [1, 3]  # -3 goes, though by magnitude it would be the most important
    assert (segments[:, :4] == 0).all() and (segments[:, 4:] == 1).all()  # -8 .. -5


def test_authors_prune_at_most_12_of_16_segments():
    scores = GateScores(torch.zeros(2), torch.randn(2, SEGMENTS, generator=torch.Generator().manual_seed(0)))
    _, capped = select_gates(scores, 0.0, 0.9, MAX_PRUNED_SEGMENTS)
    assert MAX_PRUNED_SEGMENTS == 12 and (capped.sum(dim=1) == 4).all()
    _, uncapped = select_gates(scores, 0.0, 0.9)
    assert (uncapped.sum(dim=1) == 2).all()  # floor(0.9 · 16) = 14 without the cap


def test_reset_parameters_draws_like_building_the_model_anew(make_vit):
    """The authors' rewind rebuilds the model without reseeding: the same draws as a new model, gates 1."""
    counts, kv = prompt_counts(4, "deep", 4), [2] * 4
    model = PromptedViT(make_vit(), 3, counts, kv_counts=kv, gated=True)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)  # "trained"
    vit = make_vit()
    torch.manual_seed(7)
    reset = model.reset_parameters().trainable_state()
    torch.manual_seed(7)
    fresh = PromptedViT(vit, 3, counts, kv_counts=kv, gated=True).trainable_state()
    assert reset.keys() == fresh.keys()
    for name, tensor in fresh.items():
        assert torch.equal(tensor, reset[name]), name


def test_authors_job_trains_gates_rewinds_to_fresh_values_and_resumes(small_digits, monkeypatch):
    """Gates train in phase 1 and are scored at their trained values; at most 12 of 16 segments go; phase 2
    starts from fresh draws (not the initial values) of the same distributions; a checkpoint keeps the gates."""
    starts = _record_train_starts(monkeypatch)
    scored, real_importance = [], prune_module.gate_importance

    def recording_importance(net, prompted, *args):
        scored.append(prompted.prompts.segment_gate.detach().clone())
        return real_importance(net, prompted, *args)

    monkeypatch.setattr(prune_module, "gate_importance", recording_importance)  # (read when the stage runs)
    job = _job(small_digits, "authors", segment_ratio=0.9)
    checkpoints = {}
    model, metrics = run(job, CPU, on_epoch=lambda epoch, m, checkpoint: checkpoints.update({epoch: checkpoint()}))
    initial, retrained_from = starts
    assert torch.equal(initial["prompts.segment_gate"], torch.ones(4, SEGMENTS))
    assert not torch.equal(scored[0], initial["prompts.segment_gate"])  # scored at the trained values
    assert not model.prompts.gated and "prompts.token_gate" not in retrained_from
    assert sum(model.prompts.counts) == 2 * 12 and "val_acc_unpruned" in metrics

    values = []
    for block in model.prompts.tokens:
        mask = model.prompts.mask(int(block))
        assert (mask[:, :SEGMENTS].sum(dim=1) == SEGMENTS - MAX_PRUNED_SEGMENTS).all()  # 14 asked, 12 pruned
        first = initial[f"prompts.tokens.{block}"]
        for j, row in enumerate(retrained_from[f"prompts.tokens.{block}"]):
            assert not any(torch.equal(first[i] * mask[j], row) for i in range(4)), (block, j)
            values.append(row[mask[j] == 1])
    values, bound = torch.cat(values), model.init_bound
    assert values.abs().max() <= bound and values.std() == pytest.approx(bound / math.sqrt(3), rel=0.1)  # U(-v, v)
    head = retrained_from["head.weight"]
    assert not torch.equal(head, initial["head.weight"]) and head.std() == pytest.approx(0.02, rel=0.15)
    assert not retrained_from["head.bias"].any()
    kv = [name for name in initial if name.startswith("kv_prompts.")]
    assert kv and not any(torch.equal(initial[name], retrained_from[name]) for name in kv)

    assert "prompts.token_gate" in checkpoints[0]["trainable"]  # a restart in phase 1 continues the gates
    resumed, resumed_metrics = run(job, CPU, resume=checkpoints[0])
    for name, tensor in model.trainable_state().items():
        assert torch.equal(tensor, resumed.trainable_state()[name]), name
    assert resumed_metrics["val_acc"] == metrics["val_acc"]


def test_pruning_folds_trained_gates_into_the_prompts(make_vit, images):
    model = _deep(make_vit, gated=True)
    with torch.no_grad():
        model.prompts.token_gate.uniform_(0.5, 1.5)
        model.prompts.segment_gate.uniform_(0.5, 1.5)
    gated = model(images)
    prune_(model, [0, 1, 2, 3], torch.ones(4, SEGMENTS))
    assert not model.prompts.gated
    assert torch.allclose(model(images), gated, rtol=1e-6, atol=1e-7)
