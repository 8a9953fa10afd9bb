"""VPT prompt semantics of PromptedViT over small random timm ViTs (METHODS.md, VPT section)."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from vpt_tune.models.backbone import ModelError, create_backbone
from vpt_tune.models.placement import prompt_counts, tokens_per_block
from vpt_tune.models.prompted_vit import PromptedViT
from vpt_tune.models.prompts import uniform_init_bound

L = 4  # blocks of the small ViT
PATCHES = 16  # 32 px / 8 px patches, squared
T = 3  # prompts per block in most tests


def _prompt(model: PromptedViT, block: int) -> torch.Tensor:
    return model.prompts.tokens[str(block)]


# ---------------------------------------------------------------- prompt count vectors


def test_prompt_counts_per_placement():
    assert prompt_counts(5, "shallow", L) == [5, 0, 0, 0]
    assert prompt_counts(5, "deep", L) == [5, 5, 5, 5]
    assert prompt_counts(5, "first_k", L, depth=2) == [5, 5, 0, 0]
    assert prompt_counts(5, "last_k", L, depth=1) == [0, 0, 0, 5]
    assert prompt_counts(5, "last_k", L, depth=L) == prompt_counts(5, "deep", L)
    assert prompt_counts(5, "layers", L, layers=[3, 1, 1]) == [0, 5, 0, 5]
    assert prompt_counts(0, "deep", L) == [0, 0, 0, 0]


def test_tokens_per_block_replace_or_carry():
    # Shallow prompts are carried through every block; deep ones are replaced by the same number.
    assert tokens_per_block(prompt_counts(5, "shallow", L)) == [5, 5, 5, 5]
    assert tokens_per_block(prompt_counts(5, "deep", L)) == [5, 5, 5, 5]
    assert tokens_per_block(prompt_counts(5, "first_k", L, depth=2)) == [5, 5, 5, 5]
    assert tokens_per_block(prompt_counts(5, "last_k", L, depth=2)) == [0, 0, 5, 5]
    assert tokens_per_block(prompt_counts(5, "layers", L, layers=[1, 3])) == [0, 5, 5, 5]
    # Unequal counts (condensation): a fresh set replaces the carried one, whatever its size.
    assert tokens_per_block([3, 0, 7, 0, 2]) == [3, 3, 7, 7, 2]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(num_prompts=-1, placement="deep"), "num_prompts"),
        (dict(num_prompts=4, placement="first_k"), "depth"),
        (dict(num_prompts=4, placement="last_k", depth=0), "depth"),
        (dict(num_prompts=4, placement="last_k", depth=L + 1), "depth"),
        (dict(num_prompts=4, placement="layers"), "layers"),
        (dict(num_prompts=4, placement="layers", layers=[]), "layers"),
        (dict(num_prompts=4, placement="layers", layers=[0, L]), "layers"),
        (dict(num_prompts=4, placement="layers", layers=[-1]), "layers"),
        (dict(num_prompts=4, placement="diagonal"), "diagonal"),
    ],
)
def test_prompt_counts_rejects_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        prompt_counts(num_blocks=L, **kwargs)


@pytest.mark.parametrize("counts", [[1, 1, 1], [1] * (L + 1), []])
def test_prompted_vit_needs_one_count_per_block(small_vit, counts):
    with pytest.raises(ValueError, match=f"one prompt count per block \\({L}\\)"):
        PromptedViT(small_vit, 3, counts)


# ---------------------------------------------------------------- sequence layout in each block


@pytest.mark.parametrize(
    "counts",
    [
        prompt_counts(T, "shallow", L),
        prompt_counts(T, "deep", L),
        prompt_counts(T, "first_k", L, depth=2),
        prompt_counts(T, "last_k", L, depth=2),
        prompt_counts(T, "layers", L, layers=[1, 3]),
        [2, 0, 5, 1],
        [0, 0, 0, 0],
    ],
    ids=["shallow", "deep", "first_k", "last_k", "layers", "unequal", "none"],
)
def test_sequence_length_in_every_block(small_vit, images, record_blocks, counts):
    model = PromptedViT(small_vit, 3, counts).eval()
    with record_blocks(small_vit) as rec, torch.no_grad():
        model(images)
    prefix = small_vit.num_prefix_tokens
    assert rec.lengths() == [prefix + p + PATCHES for p in tokens_per_block(counts)]


def test_shallow_prompts_are_carried_every_block(small_vit, images, record_blocks):
    model = PromptedViT(small_vit, 3, prompt_counts(T, "shallow", L)).eval()
    with record_blocks(small_vit) as rec, torch.no_grad():
        model(images)
    assert rec.lengths() == [1 + T + PATCHES] * L
    for i in range(1, L):  # the prompt outputs of block i-1 are block i's prompt inputs
        assert torch.equal(rec.inputs[i][:, 1:1 + T], rec.outputs[i - 1][:, 1:1 + T])


def test_last_k_blocks_before_see_no_prompts(small_vit, images, record_blocks):
    model = PromptedViT(small_vit, 3, prompt_counts(T, "last_k", L, depth=1)).eval()
    with record_blocks(small_vit) as rec, torch.no_grad():
        model(images)
    assert rec.lengths() == [1 + PATCHES] * (L - 1) + [1 + T + PATCHES]
    # Blocks before the first prompted one run exactly the frozen, prompt-free forward.
    with record_blocks(small_vit) as bare, torch.no_grad():
        small_vit.forward_features(images)
    for i in range(L - 1):
        assert torch.equal(rec.outputs[i], bare.outputs[i])
    assert torch.equal(rec.inputs[L - 1][:, 1:1 + T], _prompt(model, L - 1).detach().expand(2, -1, -1))


def test_layers_placement_inserts_fresh_and_carries_between(small_vit, images, record_blocks):
    model = PromptedViT(small_vit, 3, prompt_counts(T, "layers", L, layers=[1, 3])).eval()
    with record_blocks(small_vit) as rec, torch.no_grad():
        model(images)
    assert rec.lengths() == [1 + PATCHES, 1 + T + PATCHES, 1 + T + PATCHES, 1 + T + PATCHES]
    assert set(model.prompts.tokens.keys()) == {"1", "3"}
    for block in (1, 3):  # fresh prompts
        assert torch.equal(rec.inputs[block][:, 1:1 + T], _prompt(model, block).detach().expand(2, -1, -1))
    # block 2 has none: it receives block 1's prompt outputs
    assert torch.equal(rec.inputs[2][:, 1:1 + T], rec.outputs[1][:, 1:1 + T])


def test_deep_prompts_replace_previous_prompt_outputs(small_vit, images, record_blocks):
    model = PromptedViT(small_vit, 3, prompt_counts(T, "deep", L)).eval()
    with record_blocks(small_vit) as rec, torch.no_grad():
        model(images)
    for i in range(L):
        assert torch.equal(rec.inputs[i][:, 1:1 + T], _prompt(model, i).detach().expand(2, -1, -1))
        if i > 0:  # class token and patches come from the previous block's output
            assert torch.equal(rec.inputs[i][:, :1], rec.outputs[i - 1][:, :1])
            assert torch.equal(rec.inputs[i][:, 1 + T:], rec.outputs[i - 1][:, 1 + T:])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_changing_block_k_prompts_only_changes_blocks_from_k(small_vit, images, record_blocks, k):
    model = PromptedViT(small_vit, 3, prompt_counts(T, "deep", L)).eval()
    with record_blocks(small_vit) as before, torch.no_grad():
        logits_before = model(images)
    with torch.no_grad():  # random, not constant: a constant shift per token vanishes in LayerNorm
        _prompt(model, k).add_(torch.randn(T, small_vit.embed_dim))
    with record_blocks(small_vit) as after, torch.no_grad():
        logits_after = model(images)
    for i in range(k):
        assert torch.equal(before.outputs[i], after.outputs[i]), f"block {i} < {k} changed"
    # block k's class token and patch outputs change (not only the replaced prompt positions)
    assert not torch.allclose(before.outputs[k][:, :1], after.outputs[k][:, :1])
    assert not torch.allclose(before.outputs[k][:, 1 + T:], after.outputs[k][:, 1 + T:])
    assert not torch.allclose(logits_before, logits_after)


def test_prompts_carry_no_position_embedding(small_vit, images, record_blocks):
    """The tokens at the prompt positions of block 0's input are the prompt parameters themselves,
    while the class token and patches are exactly timm's embedded tokens (with position embedding)."""
    model = PromptedViT(small_vit, 3, prompt_counts(T, "shallow", L)).eval()
    with record_blocks(small_vit) as rec, torch.no_grad():
        model(images)
        embedded = model.embed(images)
    x0 = rec.inputs[0]
    assert torch.equal(x0[:, 1:1 + T], _prompt(model, 0).detach().expand(2, -1, -1))
    assert torch.equal(x0[:, :1], embedded[:, :1])
    assert torch.equal(x0[:, 1 + T:], embedded[:, 1:])
    # the embedding really adds a position table (so "no position embedding" is a real distinction)
    assert not torch.allclose(embedded[:, 1:], small_vit.patch_embed(images))


# ---------------------------------------------------------------- equivalence with the frozen model


def test_zero_prompts_equal_frozen_timm_forward(small_vit, images):
    model = PromptedViT(small_vit, 5, [0] * L).eval()
    with torch.no_grad():
        features = model.forward_blocks(model.embed(images))
        reference = small_vit.forward_features(images)
        assert torch.equal(features, reference)
        assert torch.equal(model(images), model.head(reference[:, 0]))
    assert len(model.prompts.tokens) == 0


def test_prompts_change_the_logits(small_vit, images):
    bare = PromptedViT(small_vit, 5, [0] * L).eval()
    prompted = PromptedViT(small_vit, 5, prompt_counts(T, "deep", L)).eval()
    prompted.head.load_state_dict(bare.head.state_dict())
    with torch.no_grad():
        assert not torch.allclose(bare(images), prompted(images))


def test_head_reads_class_token_after_final_norm(small_vit, images, record_blocks):
    model = PromptedViT(small_vit, 5, prompt_counts(T, "deep", L)).eval()
    with record_blocks(small_vit) as rec, torch.no_grad():
        logits = model(images)
        expected = model.head(small_vit.norm(rec.outputs[L - 1])[:, 0])
    assert logits.shape == (2, 5)
    assert torch.equal(logits, expected)


# ---------------------------------------------------------------- initialisation and dropout


def test_uniform_init_bound_paper_value():
    assert uniform_init_bound(16, 768) == pytest.approx(0.0625)  # VPT, ViT-B/16


def test_prompts_are_uniform_within_the_bound(make_vit):
    vit = make_vit(embed_dim=96, num_heads=3)
    torch.manual_seed(0)
    model = PromptedViT(vit, 3, prompt_counts(50, "deep", L))
    bound = math.sqrt(6.0 / (3 * 8 * 8 + 96))  # METHODS.md: v = sqrt(6 / (3 p^2 + D))
    values = torch.cat([p.detach().flatten() for p in model.prompts.tokens.values()])
    assert values.numel() == 50 * 96 * L
    assert values.abs().max() <= bound
    assert values.abs().max() > 0.95 * bound  # spread over the whole interval, not a narrower one
    assert abs(values.mean().item()) < 0.05 * bound
    assert values.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # uniform's std


def test_prompt_dropout_only_in_train_mode(small_vit, images, record_blocks):
    torch.manual_seed(0)
    model = PromptedViT(small_vit, 3, prompt_counts(T, "deep", L), prompt_dropout=0.5)
    params = _prompt(model, 0).detach().expand(2, -1, -1)
    model.train()
    with record_blocks(small_vit) as rec, torch.no_grad():
        first = model(images)
        second = model(images)
    seen = rec.inputs[0][:, 1:1 + T]  # the last forward's prompts
    assert (seen == 0).any()
    kept = seen != 0
    assert torch.allclose(seen[kept], (params * 2.0)[kept])  # inverted dropout scaling 1/(1-p)
    assert not torch.equal(first, second)
    model.eval()
    with record_blocks(small_vit) as rec, torch.no_grad():
        assert torch.equal(model(images), model(images))
    assert torch.equal(rec.inputs[0][:, 1:1 + T], params)


def test_backbone_stays_in_eval_mode(make_vit, images):
    vit = make_vit(drop_rate=0.5, attn_drop_rate=0.5, drop_path_rate=0.5, proj_drop_rate=0.5)
    model = PromptedViT(vit, 3, prompt_counts(T, "deep", L), prompt_dropout=0.0)
    model.train()
    assert model.training and model.prompts.training and model.head.training
    assert not any(m.training for m in model.backbone.modules())
    with torch.no_grad():  # backbone dropout / drop path would make these differ
        assert torch.equal(model(images), model(images))
    model.train(False)
    assert not any(m.training for m in model.modules())


# ---------------------------------------------------------------- what trains


@pytest.mark.parametrize("placement", ["shallow", "deep", "last_k"])
def test_only_prompts_and_head_get_gradients(small_vit, images, placement):
    counts = prompt_counts(T, placement, L, depth=2)
    model = PromptedViT(small_vit, 3, counts).train()
    loss = torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 2]))
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"prompts.tokens.{i}" for i, c in enumerate(counts) if c > 0} | {"head.weight", "head.bias"}
    assert set(trainable) == expected
    for name, param in trainable.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- saving and loading


def test_load_trainable_keeps_the_model_dtype(make_vit, images):
    """A float64 model saved and loaded into another float64 model: float64 prompts, masks and gates
    (not rebuilt in float32) and the same logits."""
    counts = prompt_counts(T, "deep", L)
    torch.manual_seed(0)
    saved = PromptedViT(make_vit(), 3, counts, kv_counts=[1] * L, gated=True).double()
    with torch.no_grad():
        for param in saved.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))  # "trained", gates included
    saved.prompts.masks.register_buffer("1", (torch.rand(T, saved.prompts.embed_dim) > 0.5).double())
    logits = saved(images.double())
    loaded = PromptedViT(make_vit(), 3, counts, kv_counts=[1] * L).double().load_trainable(saved.trainable_state())
    assert loaded.prompts.gated and loaded.prompts.mask(1) is not None
    assert {t.dtype for t in loaded.prompts.state_dict().values()} == {torch.float64}
    assert torch.equal(loaded(images.double()), logits)


# ---------------------------------------------------------------- other ViT families and sizes


FAMILIES = [
    # (timm name, kwargs, prefix tokens: class + registers / distillation token, image size)
    ("vit_small_patch14_reg4_dinov2", dict(embed_dim=48, num_heads=3), 5, 28),
    ("deit_tiny_patch16_224", dict(embed_dim=48, num_heads=3), 1, 32),
    ("deit_tiny_distilled_patch16_224", dict(embed_dim=48, num_heads=3), 2, 32),
]


@pytest.mark.parametrize("name, kwargs, prefix, size", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_prompts_follow_all_prefix_tokens(record_blocks, name, kwargs, prefix, size):
    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False, num_classes=0, depth=2, img_size=size, **kwargs)
    vit = vit.eval()
    assert vit.num_prefix_tokens == prefix
    if "dinov2" in name:
        assert type(vit.blocks[0].ls1).__name__ == "LayerScale"
    patches = vit.patch_embed.num_patches
    model = PromptedViT(vit, 4, [3, 2]).eval()
    x = torch.randn(2, 3, size, size)
    with record_blocks(vit) as rec, torch.no_grad():
        logits = model(x)
        embedded = model.embed(x)
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()
    assert embedded.shape[1] == prefix + patches
    x0, x1 = rec.inputs[0], rec.inputs[1]
    assert x0.shape[1] == prefix + 3 + patches and x1.shape[1] == prefix + 2 + patches
    assert torch.equal(x0[:, :prefix], embedded[:, :prefix])
    assert torch.equal(x0[:, prefix:prefix + 3], _prompt(model, 0).detach().expand(2, -1, -1))
    assert torch.equal(x0[:, prefix + 3:], embedded[:, prefix:])
    assert torch.equal(x1[:, :prefix], rec.outputs[0][:, :prefix])
    assert torch.equal(x1[:, prefix:prefix + 2], _prompt(model, 1).detach().expand(2, -1, -1))
    assert torch.equal(x1[:, prefix + 2:], rec.outputs[0][:, prefix + 3:])
    # and without prompts it is the family's own timm forward
    bare = PromptedViT(vit, 4, [0, 0]).eval()
    with torch.no_grad():
        assert torch.equal(bare.forward_blocks(bare.embed(x)), vit.forward_features(x))


@pytest.mark.parametrize("size", [48, 64])
def test_any_image_size_via_create_backbone(record_blocks, size):
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_patch16_224", "random", size)
    assert not vit.training and not any(p.requires_grad for p in vit.parameters())
    model = PromptedViT(vit, 7, prompt_counts(2, "last_k", len(vit.blocks), depth=1)).eval()
    with record_blocks(vit) as rec, torch.no_grad():
        logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    assert rec.lengths()[-1] == 1 + 2 + (size // 16) ** 2


def test_create_backbone_rejects_unknown_model_and_missing_weights():
    with pytest.raises(ModelError, match="vit_nope"):
        create_backbone("vit_nope", "random", 32)
    with pytest.raises(ModelError, match="does not exist"):
        create_backbone("vit_tiny_patch16_224", "/nonexistent/weights.safetensors", 32)


def test_create_backbone_rejects_non_vit_model():
    """A timm model that is not a VisionTransformer is a user error (spec typo), not a crash."""
    with pytest.raises(ModelError, match="resnet18"):
        create_backbone("resnet18", "random", 32)
