"""CVPT cross visual prompts (METHODS.md, CVPT section): the cross-attention maths, the block order,
weight sharing, gradients, FLOPs and refusals."""

from __future__ import annotations

import math

import pytest
import torch
from timm.layers.attention import Attention
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vpt_tune.models.cross_prompts import CrossPromptedBlock, add_cross_prompts, cross_attention_macs
from vpt_tune.models.kv_prompts import add_kv_prompts
from vpt_tune.models.prompts import uniform_init_bound

L, D, N = 4, 48, 17  # blocks, width and tokens (16 patches + class token) of the small ViT
EPS = torch.finfo(torch.float32).eps
BOUND = uniform_init_bound(8, D)


def _reference(attn: Attention, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """By hand in float64: proj(softmax(q(x)·k(P)ᵀ/√d)·v(P)) per head, q/k/v the rows of the frozen qkv."""
    x, prompts = x.double(), prompts.double()
    B, n, _ = x.shape
    heads, d = attn.num_heads, attn.head_dim
    w_q, w_k, w_v = attn.qkv.weight.double().split(D)
    b_q, b_k, b_v = attn.qkv.bias.double().split(D)
    q = (x @ w_q.T + b_q).reshape(B, n, heads, d).transpose(1, 2)  # (B, heads, n, d)
    k = (prompts @ w_k.T + b_k).reshape(-1, heads, d).transpose(0, 1)  # (heads, P, d)
    v = (prompts @ w_v.T + b_v).reshape(-1, heads, d).transpose(0, 1)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)  # (B, heads, n, P)
    out = (weights @ v).transpose(1, 2).reshape(B, n, D)
    return out @ attn.proj.weight.double().T + attn.proj.bias.double()


def _assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding: a few eps per term of a width-D sum, relative to the largest output."""
    error = (got.detach().double() - expected.double()).abs().max().item()
    assert error <= 4 * D * EPS * expected.abs().max().item(), error


@torch.no_grad()
def _with_biases(vit: nn.Module) -> nn.Module:
    """timm initialises biases to zero: give every linear bias of the blocks values, so they are tested."""
    gen = torch.Generator().manual_seed(5)
    for module in vit.blocks.modules():
        if isinstance(module, nn.Linear):
            module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=gen))
    return vit


def _macs(model: nn.Module, images: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter:  # (its module tracker needs autograd on)
        model(images)
    return counter.get_total_flops() / 2  # torch counts 2 FLOPs per multiply-add


def test_zero_branch_gives_the_backbone(make_vit, images, monkeypatch):
    plain, vit = make_vit(), make_vit()
    add_cross_prompts(vit, [2, 0, 3, 1], BOUND)
    assert not torch.equal(vit(images), plain(images))  # the prompts do act
    monkeypatch.setattr(CrossPromptedBlock, "cross_attention", lambda self, x, prompts: 0 * x)
    assert torch.equal(vit(images), plain(images))


def test_no_prompted_blocks_leave_the_model_identical(make_vit, images):
    plain, vit = make_vit(), make_vit()
    blocks = list(vit.blocks)
    prompts = add_cross_prompts(vit, [0] * L, BOUND)
    assert all(a is b for a, b in zip(vit.blocks, blocks)) and not list(prompts.parameters())
    assert torch.equal(vit(images), plain(images))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("count", [1, 3, 7])
def test_cross_attention_matches_explicit_softmax(make_vit, fused, count):
    vit = _with_biases(make_vit(fused_attn=fused))
    prompts = add_cross_prompts(vit, [count] * L, BOUND)
    x = torch.randn(2, N, D, generator=torch.Generator().manual_seed(2))
    for i, block in enumerate(vit.blocks):
        _assert_close(block.cross_attention(x, prompts(i)), _reference(block.block.attn, x, prompts(i)))


@pytest.mark.parametrize("fused", [True, False])
def test_block_order_attention_then_cross_then_mlp(make_vit, fused):
    vit = _with_biases(make_vit(fused_attn=fused))
    prompts = add_cross_prompts(vit, [0, 4, 0, 0], BOUND)
    wrapped = vit.blocks[1]
    b = wrapped.block
    x = torch.randn(2, N, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x1 = x + b.attn(b.norm1(x))
        x2 = x1 + _reference(b.attn, x1, prompts(1)).float()
        expected = x2 + b.mlp(b.norm2(x2))
        got = wrapped(x)
    _assert_close(got, expected)
    assert not torch.allclose(got, b(x), rtol=0, atol=1e-3)  # unlike the plain block


def test_one_prompt_adds_one_vector_to_every_token(make_vit):
    vit = _with_biases(make_vit(fused_attn=False))
    prompts = add_cross_prompts(vit, [1] * L, BOUND)
    x = torch.randn(2, N, D, generator=torch.Generator().manual_seed(4))
    for i, block in enumerate(vit.blocks):
        attn, p = block.block.attn, prompts(i)
        with torch.no_grad():
            delta = block.cross_attention(x, p)
            constant = attn.proj(p @ attn.qkv.weight[2 * D :].T + attn.qkv.bias[2 * D :])  # proj(v(P)): (1, D)
        _assert_close(delta, constant.expand_as(delta))


def test_only_prompts_train_and_receive_gradients(make_vit, images):
    vit = make_vit()
    frozen, originals = list(vit.parameters()), list(vit.blocks)
    owner = nn.Module()
    owner.vit = vit
    owner.prompts = add_cross_prompts(vit, [2, 0, 3, 1], BOUND)
    wrapped = [vit.blocks[i] for i in (0, 2, 3)]
    assert all(isinstance(block, CrossPromptedBlock) for block in wrapped)
    assert all(block.block is originals[i] for i, block in zip((0, 2, 3), wrapped))
    # the backbone gained no parameters (weights are shared, not copied) and stays frozen
    assert {id(p) for p in vit.parameters()} == {id(p) for p in frozen}
    assert not any(p.requires_grad for p in vit.parameters())
    trainable = [name for name, p in owner.named_parameters() if p.requires_grad]
    assert trainable == ["prompts.tokens.0", "prompts.tokens.2", "prompts.tokens.3"]
    assert sorted(k for k in owner.state_dict() if "tokens" in k) == trainable  # held once, by the owner
    for tokens, count in zip(owner.prompts.tokens.values(), (2, 3, 1)):
        assert tokens.shape == (count, D) and tokens.abs().max() <= BOUND and tokens.std() > BOUND / 4
    vit(images).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in owner.prompts.parameters())
    assert all(p.grad is None for p in vit.parameters())


def test_counted_flops_match_cross_attention_macs(make_vit):
    counts = [2, 0, 3, 7]
    plain, vit = make_vit(fused_attn=False), make_vit(fused_attn=False)
    add_cross_prompts(vit, counts, BOUND)
    images = torch.randn(1, 3, 32, 32)
    extra = _macs(vit, images) - _macs(plain, images)
    expected = sum(cross_attention_macs(N, c, D) for c in counts if c > 0)
    assert extra == pytest.approx(expected, rel=0.01)
    assert cross_attention_macs(N, 2, D) == 2 * N * D * D + 2 * 2 * D * D + 2 * N * 2 * D


def test_refuses_second_install_and_foreign_attention(make_vit):
    vit = make_vit()
    add_cross_prompts(vit, [1, 1, 0, 0], BOUND)
    with pytest.raises(ValueError, match="block 0 already carries CVPT prompts"):
        add_cross_prompts(vit, [1, 1, 0, 0], BOUND)
    vit = make_vit()
    add_kv_prompts(vit, [0, 0, 2, 0])
    with pytest.raises(ValueError, match="block 2 is a Block with KVPromptedAttention"):
        add_cross_prompts(vit, [1] * L, BOUND)
    vit = make_vit()
    vit.blocks[3] = nn.Identity()
    with pytest.raises(ValueError, match="block 3 is a Identity with NoneType"):
        add_cross_prompts(vit, [1] * L, BOUND)
    assert add_cross_prompts(vit, [1, 1, 1, 0], BOUND).counts == [1, 1, 1, 0]  # unprompted blocks may be anything


def _cvpt_job(task_dir: str = "", **params):
    from vpt_tune.train.job import Job

    return Job(model="vit_tiny_patch16_224", weights="random", img_size=32, task_dir=task_dir, epochs=1, batch_size=100,
               method="cvpt", params={"num_prompts": 3, "placement": "last_k", "depth": 8, "base_lr": 0.1, **params})


@pytest.mark.parametrize("placement, first", [("last_k", 4), ("deep", 0)])
def test_a_cvpt_job_builds_cross_prompts_only_and_costs_what_the_flop_counter_counts(placement, first):
    from vpt_tune.cost import ViTShape, prompted_cost
    from vpt_tune.train.job import build_model, expected_cost, model_cost

    job = _cvpt_job(placement=placement)
    model = build_model(job, 10).eval()
    prompted = range(first, 12)
    assert model.prompts.counts == [0] * 12 and model.cross_prompts.counts == [0] * first + [3] * (12 - first)
    assert model.first_prompted_block == first  # blocks before stay a frozen prefix (the prefix cache)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"cross_prompts.tokens.{i}" for i in prompted} | {"head.weight", "head.bias"}
    assert set(model.trainable_state()) == trainable
    expected = expected_cost(job, classes=10)
    assert expected == model_cost(model, job)
    shape = ViTShape.of(model.backbone)
    plain = prompted_cost(shape, [0] * 12, 10)
    assert expected.prompt_tokens == 0 and expected.kv_tokens == 3 * len(prompted) / 12 and expected.gflops > plain.gflops
    assert expected.trainable_params == plain.trainable_params + len(prompted) * 3 * 192
    for block in model.backbone.blocks:
        (getattr(block, "block", block)).attn.fused_attn = False
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 32, 32))
    assert expected.gflops * 1e9 == pytest.approx(counter.get_total_flops() / 2, rel=0.01)


def test_a_cvpt_job_trains_and_the_spec_keeps_sequence_add_ons_away(tmp_path):
    from vpt_tune.data.demo import materialise
    from vpt_tune.spec import SpecError, validate
    from vpt_tune.train.job import run

    model, metrics = run(_cvpt_job(str(materialise("digits", tmp_path))), torch.device("cpu"))
    assert 0 <= metrics["val_acc"] <= 1 and metrics["prompt_tokens"] == 0 and metrics["kv_tokens"] == 2
    base = {"name": "t", "method": "cvpt", "space": {"num_prompts": {"int": [1, 8]}}}
    assert validate(base).method == "cvpt"
    for entry in ({"condensation_ratio": 0.5}, {"prompt_init": "spt_mean"}):
        with pytest.raises(SpecError, match="needs a method whose prompts join the sequence, not cvpt"):
            validate({**base, "space": {**base["space"], **entry}})


def test_cli_cost_of_cvpt_counts_cross_attention_not_sequence_tokens(capsys):
    from vpt_tune.cli import main

    assert main(["cost", "--method", "cvpt", "--prompts", "10", "--num-classes", "100"]) == 0
    out = capsys.readouterr().out
    n, d = 197, 768  # ViT-B/16 at 224 px: per block q and out projections over the tokens, k and v over the prompts
    extra = 12 * (2 * n * d * d + 2 * 10 * d * d + 2 * n * 10 * d)
    plain = 17.5641 + d * 100 / 1e9  # (METHODS.md: 17.56 GFLOPs without prompts)
    assert "prompt tokens    0 " in out and "KV tokens        10 " in out
    assert f"GFLOPs           {plain + extra / 1e9:.2f} per image" in out
    assert f"trainable params {12 * 10 * d + (d + 1) * 100:,} " in out
    assert main(["cost", "--method", "cvpt", "--counts", *["1"] * 12]) == 2
    assert "--method cvpt takes --prompts and --placement" in capsys.readouterr().err
