"""Analytic cost model: the papers' GFLOPs, a FLOP-counter cross-check, trainable parameters."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vpt_tune.cost import ViTShape, prompted_cost
from vpt_tune.models.backbone import create_backbone
from vpt_tune.models.placement import prompt_counts, tokens_per_block
from vpt_tune.models.prompted_vit import PromptedViT


@pytest.fixture(scope="module")
def vit_b16() -> ViTShape:
    return ViTShape.for_model("vit_base_patch16_224", 224)


@pytest.mark.parametrize(
    "prompts, gflops",
    # Prompt Condensation paper / METHODS.md, ViT-B/16 at 224 px (one multiply-add = one FLOP)
    [(0, 17.56), (5, 18.03), (10, 18.49), (50, 22.22), (100, 26.97), (150, 31.81), (200, 36.74)],
)
def test_paper_gflops_vit_b16(vit_b16, prompts, gflops):
    cost = prompted_cost(vit_b16, prompt_counts(prompts, "deep", 12))
    assert cost.gflops == pytest.approx(gflops, abs=0.05)
    # shallow prompts are carried through every block: the same sequence lengths, the same cost
    assert prompted_cost(vit_b16, prompt_counts(prompts, "shallow", 12)).gflops == pytest.approx(cost.gflops)


def test_e2vpt_paper_gflops_vit_b16(vit_b16):
    # E²VPT's VTAB setting: 10 deep visual prompts + 5 key/value prompts in every block
    cost = prompted_cost(vit_b16, prompt_counts(10, "deep", 12), kv_counts=[5] * 12)
    assert cost.gflops == pytest.approx(18.51, abs=0.05)
    assert (cost.prompt_tokens, cost.kv_tokens) == (10, 5)  # KV prompts counted separately
    extra = (cost.gflops - prompted_cost(vit_b16, prompt_counts(10, "deep", 12)).gflops) * 1e9
    assert extra == pytest.approx(12 * 2 * (197 + 10) * 5 * 768)  # only the attention term grows


def test_vit_b16_shape(vit_b16):
    assert (vit_b16.depth, vit_b16.embed_dim, vit_b16.mlp_hidden) == (12, 768, 3072)
    assert (vit_b16.num_patches, vit_b16.num_prefix_tokens, vit_b16.in_chans) == (196, 1, 3)
    assert vit_b16.in_chans * vit_b16.patch_area == 3 * 16 * 16  # weights per patch-embedding output


def test_vit_shape_of_reads_the_model(make_vit):
    vit = make_vit(depth=3, embed_dim=60, num_heads=3, patch_size=8, img_size=48, mlp_ratio=3.0)
    shape = ViTShape.of(vit)
    assert shape.depth == 3
    assert shape.embed_dim == 60
    assert shape.mlp_hidden == 180
    assert shape.num_patches == (48 // 8) ** 2
    assert shape.num_prefix_tokens == 1
    assert shape.in_chans == 3
    assert shape.in_chans * shape.patch_area == vit.patch_embed.proj.weight[0].numel()  # C·p²
    reg = make_vit(model="vit_small_patch14_reg4_dinov2", depth=2, embed_dim=48, num_heads=3,
                   patch_size=14, img_size=28)
    assert ViTShape.of(reg).num_prefix_tokens == 5  # class + 4 registers


def test_for_model_matches_a_built_model():
    """The meta-device shape equals the shape of the model create_backbone builds at that size."""
    assert ViTShape.for_model("vit_tiny_patch16_224", 48) == ViTShape.of(create_backbone("vit_tiny_patch16_224",
                                                                                         "random", 48))


PLACEMENTS = [("shallow", None), ("deep", None), ("last_k", 2), ("first_k", 1)]


@pytest.mark.parametrize(
    "vit_kwargs",
    [
        dict(model="vit_tiny_patch16_224", depth=4, embed_dim=48, num_heads=3, patch_size=8, img_size=32,
             mlp_ratio=3.0),
        dict(model="vit_small_patch14_reg4_dinov2", depth=4, embed_dim=48, num_heads=3, patch_size=14,
             img_size=28),
    ],
    ids=["vit-mlp3", "dinov2-reg4"],
)
@pytest.mark.parametrize("placement, depth", PLACEMENTS, ids=[p for p, _ in PLACEMENTS])
def test_analytic_flops_match_flop_counter(make_vit, vit_kwargs, placement, depth):
    # Small width and many tokens so the attention term (2·N²·D) is ~10 % of the total and matters.
    vit = make_vit(fused_attn=False, **vit_kwargs)  # FlopCounterMode does not see fused attention on CPU
    counts = prompt_counts(16, placement, len(vit.blocks), depth=depth)
    model = PromptedViT(vit, 5, counts).eval()
    size = vit_kwargs["img_size"]
    with FlopCounterMode(display=False) as counter:  # (its module tracker needs autograd on)
        model(torch.randn(1, 3, size, size))
    counted_macs = counter.get_total_flops() / 2  # torch counts 2 FLOPs per multiply-add
    analytic_macs = prompted_cost(ViTShape.of(vit), counts, num_classes=5).gflops * 1e9
    assert analytic_macs == pytest.approx(counted_macs, rel=0.01)


@pytest.mark.parametrize(
    "vit_kwargs",
    [
        dict(model="vit_tiny_patch16_224", depth=4, embed_dim=48, num_heads=3, patch_size=8, img_size=32),
        dict(model="vit_small_patch14_reg4_dinov2", depth=4, embed_dim=48, num_heads=3, patch_size=14,
             img_size=28),
    ],
    ids=["vit", "dinov2-reg4"],
)
@pytest.mark.parametrize("counts, kv_counts", [([16] * 4, [16] * 4), ([16, 0, 0, 0], [0, 8, 0, 24])],
                         ids=["deep", "shallow-unequal-kv"])
def test_analytic_kv_flops_match_flop_counter(make_vit, vit_kwargs, counts, kv_counts):
    # The KV attention follows `fused_attn` like timm: explicit matmul + softmax, which the counter sees.
    vit = make_vit(fused_attn=False, **vit_kwargs)
    model = PromptedViT(vit, 5, counts, kv_counts=kv_counts).eval()
    size = vit_kwargs["img_size"]
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, size, size))
    analytic_macs = prompted_cost(ViTShape.of(vit), counts, 5, kv_counts).gflops * 1e9
    assert analytic_macs == pytest.approx(counter.get_total_flops() / 2, rel=0.01)
    assert analytic_macs > prompted_cost(ViTShape.of(vit), counts, 5).gflops * 1e9  # the KV term is seen


def test_flops_grow_with_prompt_tokens_present(vit_b16):
    deep = prompted_cost(vit_b16, prompt_counts(50, "deep", 12)).gflops
    last = prompted_cost(vit_b16, prompt_counts(50, "last_k", 12, depth=6)).gflops
    none = prompted_cost(vit_b16, prompt_counts(0, "deep", 12)).gflops
    assert none < last < deep
    assert last - none == pytest.approx((deep - none) / 2, rel=0.01)  # half the blocks carry prompts


@pytest.mark.parametrize(
    "counts", [prompt_counts(5, "deep", 4), prompt_counts(5, "shallow", 4), [3, 0, 7, 1], [0, 0, 0, 0]]
)
def test_trainable_params_and_tokens_match_the_model(small_vit, counts):
    model = PromptedViT(small_vit, 7, counts)
    cost = prompted_cost(ViTShape.of(small_vit), counts, num_classes=7)
    assert cost.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert cost.prompt_tokens == pytest.approx(sum(tokens_per_block(counts)) / 4)
    assert set(cost.as_dict()) == {"prompt_tokens", "kv_tokens", "trainable_params", "gflops"}


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "separate"])
@pytest.mark.parametrize("kv_counts", [[5] * 4, [0, 2, 0, 7]])
def test_kv_trainable_params_and_tokens_match_the_model(make_vit, kv_counts, shared):
    counts = prompt_counts(3, "deep", 4)
    model = PromptedViT(make_vit(), 7, counts, kv_counts=kv_counts, kv_shared=shared)
    cost = prompted_cost(ViTShape.of(model.backbone), counts, 7, kv_counts, kv_shared=shared)
    assert cost.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    kv_params = sum(p.numel() for p in model.kv_prompts.parameters())
    assert kv_params == sum(kv_counts) * 48 * (1 if shared else 2)  # heads · T_kv · head_dim = T_kv · D
    assert cost.kv_tokens == pytest.approx(sum(kv_counts) / 4)


def test_prompt_tokens_is_mean_over_blocks(vit_b16):
    # last 3 of 12 blocks carry 8 prompts -> 8 * 3 / 12 = 2 tokens on average
    assert prompted_cost(vit_b16, prompt_counts(8, "last_k", 12, depth=3)).prompt_tokens == pytest.approx(2.0)
    assert prompted_cost(vit_b16, prompt_counts(8, "shallow", 12)).prompt_tokens == pytest.approx(8.0)


def test_head_adds_its_multiply_adds(vit_b16):
    counts = prompt_counts(10, "deep", 12)
    without, with_head = prompted_cost(vit_b16, counts), prompted_cost(vit_b16, counts, num_classes=100)
    assert (with_head.gflops - without.gflops) * 1e9 == pytest.approx(768 * 100)
    assert with_head.trainable_params - without.trainable_params == 769 * 100


def test_wrong_count_length_is_rejected(vit_b16):
    with pytest.raises(ValueError, match="one prompt count per block"):
        prompted_cost(vit_b16, [10] * 11)
    with pytest.raises(ValueError, match="one KV prompt count per block"):
        prompted_cost(vit_b16, [10] * 12, kv_counts=[5] * 11)
    with pytest.raises(ValueError, match="KV prompt counts must be >= 0"):
        prompted_cost(vit_b16, [10] * 12, kv_counts=[-1] * 12)
