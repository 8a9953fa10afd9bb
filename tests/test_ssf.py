"""SSF (METHODS.md, SSF section): which ops are scaled, what trains, merging into the frozen weights, counts."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from vpt_tune.models.backbone import freeze
from vpt_tune.models.kv_prompts import add_kv_prompts
from vpt_tune.models.ssf import ScaleShift, add_ssf, merge_ssf_, ssf_modules, ssf_parameter_count

D, L, HIDDEN = 48, 4, 4 * 48  # the small ViT of conftest.py


def _randomise(pairs: list[ScaleShift], seed: int = 5) -> None:
    """Scales ~ N(1, 0.1), shifts ~ N(0, 0.1): far enough from identity that every pair matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pair in pairs:
            pair.scale.copy_(1 + 0.1 * torch.randn(pair.scale.shape, generator=gen))
            pair.shift.copy_(0.1 * torch.randn(pair.shift.shape, generator=gen))


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
def test_identity_pairs_give_the_backbone_bit_for_bit(make_vit, images, fused):
    vit = make_vit(fused_attn=fused)
    plain = vit(images)
    pairs = add_ssf(vit)
    assert not torch.equal(vit(images), plain)  # the authors' init, N(1, 0.02) / N(0, 0.02), is not identity
    with torch.no_grad():
        for pair in pairs:
            pair.scale.fill_(1.0)
            pair.shift.zero_()
    # x·1 + 0 is x exactly in IEEE arithmetic, and the frozen ops run unchanged: no tolerance needed.
    assert torch.equal(vit(images), plain)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
def test_merged_equals_unmerged_and_is_the_plain_architecture(make_vit, images, fused):
    vit, plain = make_vit(fused_attn=fused), make_vit(fused_attn=fused)
    _randomise(add_ssf(vit))
    unmerged = vit(images)
    assert merge_ssf_(vit) is vit
    merged = vit(images)
    assert (merged - unmerged).abs().max() <= 1e-5 * unmerged.abs().max()
    assert (merged - plain(images)).abs().max() > 1e-2 * unmerged.abs().max()  # the pairs are in the weights
    assert ssf_modules(vit) == []
    assert not any(isinstance(m, ScaleShift) for m in vit.modules())
    assert vit.state_dict().keys() == plain.state_dict().keys()
    assert sum(p.numel() for p in vit.parameters()) == sum(p.numel() for p in plain.parameters())


def test_merge_gives_a_bias_free_linear_its_shift_as_bias(make_vit, images):
    vit = make_vit(qkv_bias=False)
    _randomise(add_ssf(vit))
    unmerged = vit(images)
    merge_ssf_(vit)
    assert vit.blocks[0].attn.qkv.bias.shape == (3 * D,)
    assert not vit.blocks[0].attn.qkv.bias.requires_grad
    assert (vit(images) - unmerged).abs().max() <= 1e-5 * unmerged.abs().max()


def test_a_pair_follows_every_listed_op_with_its_width(make_vit, images):
    vit = make_vit()
    pairs = add_ssf(vit)
    per_block = [("norm1", D), ("attn.qkv", 3 * D), ("attn.proj", D), ("norm2", D), ("mlp.fc1", HIDDEN), ("mlp.fc2", D)]
    expected = [("patch_embed.proj", D), *((f"blocks.{i}.{op}", w) for i in range(L) for op, w in per_block), ("norm", D)]
    installed = [(name.removesuffix(".ssf"), m.scale.numel()) for name, m in vit.named_modules()
                 if isinstance(m, ScaleShift)]
    assert installed == expected
    assert all(p.shift.shape == p.scale.shape for p in pairs)
    base = vit(images)
    gen = torch.Generator().manual_seed(7)
    for (name, width), pair in zip(expected, pairs):
        # a random vector: a shift equal on every channel would vanish in the next LayerNorm
        delta = 0.5 * torch.randn(width, generator=gen)
        with torch.no_grad():
            pair.shift.add_(delta)
            moved = (vit(images) - base).abs().max()
            pair.shift.sub_(delta)
        assert moved > 1e-3 * base.abs().max(), name


def test_only_ssf_parameters_train_and_receive_gradients(make_vit, images):
    vit = freeze(make_vit())
    add_ssf(vit)
    trainable = {name for name, p in vit.named_parameters() if p.requires_grad}
    ssf = {name for name, _ in vit.named_parameters() if name.endswith((".ssf.scale", ".ssf.shift"))}
    assert trainable == ssf and len(ssf) == 2 * (2 + 6 * L)
    assert sum(p.numel() for p in vit.parameters() if p.requires_grad) == ssf_parameter_count(vit)
    vit(images).square().sum().backward()
    for name, param in vit.named_parameters():
        if name in ssf:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def _elementwise(*args, out_shape, **kwargs) -> int:
    return math.prod(out_shape)


def _flops(vit, images) -> int:
    """FLOPs of one forward pass, also counting elementwise mul/add (one per output element), so that
    an unmerged pair (x·scale + shift) shows up; matmuls and convs as torch counts them."""
    mapping = {torch.ops.aten.mul: _elementwise, torch.ops.aten.add: _elementwise}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        vit(images)
    return counter.get_total_flops()


def test_merged_model_counts_exactly_the_backbone_flops(make_vit, images):
    plain = make_vit(fused_attn=False)  # FlopCounterMode does not see fused attention on CPU
    vit = make_vit(fused_attn=False)
    _randomise(add_ssf(vit))
    unmerged = _flops(vit, images)
    merge_ssf_(vit)
    assert _flops(vit, images) == _flops(plain, images) < unmerged


def test_refuses_a_second_install_other_blocks_and_a_merge_without_ssf(make_vit):
    vit = make_vit()
    with pytest.raises(ValueError, match=r"no SSF to merge at patch_embed\.proj"):
        merge_ssf_(vit)
    add_ssf(vit)
    with pytest.raises(ValueError, match=r"already carries SSF \(at patch_embed\.proj\.ssf\)"):
        add_ssf(vit)
    prompted = make_vit()
    add_kv_prompts(prompted, [0, 2, 0, 0])
    with pytest.raises(ValueError, match="block 1 is a Block with KVPromptedAttention with Mlp"):
        add_ssf(prompted)
    assert ssf_modules(prompted) == []  # refused before installing anything


def test_vit_b16_count():
    vit = freeze(timm.create_model("vit_base_patch16_224", pretrained=False))
    dim, depth, hidden = 768, 12, 3072
    channels = 2 * dim + depth * (dim + 3 * dim + dim + dim + hidden + dim)  # patch proj + final norm + blocks
    assert channels == 102_912  # METHODS.md's number: (scale, shift) pairs, one per channel
    assert ssf_parameter_count(vit) == 2 * channels == 205_824
    pairs = add_ssf(vit)
    assert len(pairs) == 2 + 6 * depth
    assert sum(p.numel() for p in vit.parameters() if p.requires_grad) == 205_824
    assert sum(p.scale.numel() for p in pairs) == 102_912
