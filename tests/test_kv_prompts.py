"""E²VPT key/value prompts (METHODS.md, E²VPT section): attention maths, PromptedViT, spec, job, CLI."""

from __future__ import annotations

import copy
import math
from functools import partial

import optuna
import pytest
import timm
import torch
from timm.layers.attention import Attention

from vpt_tune.cli import main
from vpt_tune.models.kv_prompts import KVPromptedAttention, KVPrompts
from vpt_tune.models.placement import prompt_counts
from vpt_tune.models.prompted_vit import PromptedViT
from vpt_tune.search.jobs import make_job
from vpt_tune.search.space import DefineByRun
from vpt_tune.spec import SpecError, load_spec, validate
from vpt_tune.methods import get_method
from vpt_tune.train.job import expected_cost

optuna.logging.set_verbosity(optuna.logging.WARNING)

L = 4  # blocks of the small ViT
T = 3  # visual prompts per block
TKV = 2  # KV prompts per block


def _explicit(attn: Attention, x: torch.Tensor, key, value, append: bool, bias=None) -> torch.Tensor:
    """By hand: proj(softmax(q·[k_p; k]ᵀ/√d + bias)·[v_p; v]) per head, from the raw frozen weights."""
    B, N, D = x.shape
    heads, d = attn.num_heads, attn.head_dim
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = (t.reshape(B, N, heads, d).transpose(1, 2) for t in qkv.split(D, dim=-1))

    def join(prompt, tokens):
        prompt = prompt.expand(B, -1, -1, -1)
        return torch.cat([tokens, prompt] if append else [prompt, tokens], dim=2)

    k, v = join(key, k), join(value, v)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)
    assert scores.shape == (B, heads, N, key.shape[1] + N)
    if bias is not None:
        scores = scores + bias
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, D)
    return out @ attn.proj.weight.T + attn.proj.bias


def _wrapped(attn: Attention, shared: bool, position: str) -> tuple[KVPromptedAttention, KVPrompts]:
    torch.manual_seed(3)
    prompts = KVPrompts([TKV], attn.num_heads, attn.head_dim, shared)
    return KVPromptedAttention(attn, partial(prompts, 0), append=position == "append"), prompts


# ---------------------------------------------------------------- the attention itself


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("position", ["prepend", "append"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "separate"])
def test_kv_attention_equals_explicit_softmax(make_vit, shared, position, fused):
    attn = make_vit(fused_attn=fused).blocks[1].attn
    wrapper, prompts = _wrapped(attn, shared, position)
    key, value = prompts(0)
    assert (key is value) == shared and key.shape == (3, TKV, 16)  # (heads, T_kv, head_dim)
    x = torch.randn(2, 17, 48)
    with torch.no_grad():
        out = wrapper(x)
        assert out.shape == x.shape  # queries unchanged: same output length
        assert torch.allclose(out, _explicit(attn, x, key, value, position == "append"), atol=1e-5)
        # the prompts matter: the plain attention differs
        assert not torch.allclose(out, attn(x), atol=1e-3)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("position", ["prepend", "append"])
def test_masks_leave_the_prompts_visible(make_vit, position, fused):
    attn = make_vit(fused_attn=fused).blocks[0].attn
    wrapper, prompts = _wrapped(attn, False, position)
    key, value = prompts(0)
    n = 9
    x = torch.randn(2, n, 48)
    visible = torch.rand(n, n, generator=torch.Generator().manual_seed(0)) > 0.4
    visible.fill_diagonal_(True)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for mask, kwargs in ((visible, dict(attn_mask=visible)), (causal, dict(is_causal=True))):
        bias = torch.zeros(n, n).masked_fill(~mask, float("-inf"))
        columns = [bias, torch.zeros(n, TKV)] if position == "append" else [torch.zeros(n, TKV), bias]
        with torch.no_grad():
            expected = _explicit(attn, x, key, value, position == "append", torch.cat(columns, dim=1))
            assert torch.allclose(wrapper(x, **kwargs), expected, atol=1e-5)


def test_wrapper_keeps_the_frozen_modules(small_vit):
    originals = [blk.attn for blk in small_vit.blocks]
    weights = [blk.attn.qkv.weight for blk in small_vit.blocks]
    model = PromptedViT(small_vit, 3, [0] * L, kv_counts=[0, 2, 0, 5])
    for i, blk in enumerate(model.backbone.blocks):
        if i in (1, 3):
            assert isinstance(blk.attn, KVPromptedAttention)
            assert blk.attn.attn is originals[i]  # the original module, reachable
            assert blk.attn.attn.qkv.weight is weights[i]  # the same Parameter, no copy
            assert not blk.attn.training  # the frozen backbone's eval mode
        else:
            assert blk.attn is originals[i]
    assert {n: p.shape for n, p in model.kv_prompts.named_parameters()} == {
        "key.1": (3, 2, 16), "key.3": (3, 5, 16)
    }


def test_kv_init_is_kaiming_uniform_fan_in():
    torch.manual_seed(0)
    values = KVPrompts([8], num_heads=6, head_dim=32, shared=False).key["0"].detach()
    bound = math.sqrt(6.0 / (8 * 32))  # gain √2 · √3 / √fan_in, fan_in = T_kv · head_dim
    assert values.abs().max() <= bound
    assert values.abs().max() > 0.95 * bound
    assert values.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


# ---------------------------------------------------------------- PromptedViT with KV prompts


def test_zero_kv_prompts_are_the_plain_model(make_vit, images):
    counts = prompt_counts(T, "deep", L)
    torch.manual_seed(0)
    plain = PromptedViT(make_vit(), 5, counts).eval()
    torch.manual_seed(0)
    zero = PromptedViT(make_vit(), 5, counts, kv_counts=[0] * L, kv_shared=False).eval()
    assert all(type(blk.attn) is Attention for blk in zero.backbone.blocks)  # nothing replaced
    assert len(list(zero.kv_prompts.parameters())) == 0
    assert zero.state_dict().keys() == plain.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(zero(images), plain(images))
    bare = PromptedViT(make_vit(), 5, [0] * L, kv_counts=[0] * L).eval()
    with torch.no_grad():
        assert torch.equal(bare.forward_blocks(bare.embed(images)), bare.backbone.forward_features(images))


@pytest.mark.parametrize("first", [0, 2])
def test_kv_prompts_change_the_logits_from_their_first_block(make_vit, images, record_blocks, first):
    counts = prompt_counts(T, "deep", L)
    kv_counts = [TKV if i >= first else 0 for i in range(L)]
    plain = PromptedViT(make_vit(), 5, counts).eval()
    prompted = PromptedViT(make_vit(), 5, counts, kv_counts=kv_counts).eval()
    prompted.load_state_dict(plain.state_dict(), strict=False)  # same visual prompts and head
    with record_blocks(plain.backbone) as before, record_blocks(prompted.backbone) as after, torch.no_grad():
        logits_plain, logits_kv = plain(images), prompted(images)
    assert logits_kv.shape == (2, 5)
    assert before.lengths() == after.lengths()  # KV prompts never enter the token sequence
    for i in range(first):
        assert torch.equal(before.outputs[i], after.outputs[i])
    assert not torch.allclose(before.outputs[first], after.outputs[first])
    assert not torch.allclose(logits_plain, logits_kv)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "separate"])
def test_only_prompts_kv_prompts_and_head_get_gradients(small_vit, images, shared):
    counts, kv_counts = prompt_counts(T, "last_k", L, depth=2), [TKV, 0, TKV, 1]
    model = PromptedViT(small_vit, 3, counts, kv_counts=kv_counts, kv_shared=shared).train()
    loss = torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 2]))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    kv_names = {f"kv_prompts.{kind}.{i}" for kind in (["key"] if shared else ["key", "value"])
                for i, c in enumerate(kv_counts) if c > 0}
    visual = {f"prompts.tokens.{i}" for i, c in enumerate(counts) if c > 0}
    assert set(trainable) == visual | kv_names | {"head.weight", "head.bias"}
    for name, param in trainable.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_copies_keep_their_own_kv_prompts(small_vit, images):
    model = PromptedViT(small_vit, 3, [0] * L, kv_counts=[TKV] * L).eval()
    twin = copy.deepcopy(model)
    assert twin.backbone.blocks[2].attn.kv.func is twin.kv_prompts
    with torch.no_grad():
        assert torch.equal(twin(images), model(images))
        twin.kv_prompts.key["2"].add_(1.0)
        assert not torch.allclose(twin(images), model(images))


FAMILIES = [
    # DINOv2 with 4 registers and layer scale; DeiT-S; both shrunk to width 48 and 2 blocks
    ("vit_small_patch14_reg4_dinov2", dict(patch_size=14, img_size=28), 5),
    ("deit_small_patch16_224", dict(patch_size=8, img_size=32), 1),
]


@pytest.mark.parametrize("name, kwargs, prefix", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_kv_prompts_on_other_families(make_vit, record_blocks, name, kwargs, prefix):
    size = kwargs["img_size"]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    build = partial(make_vit, model=name, depth=2, embed_dim=48, num_heads=3, **kwargs)
    vit = build()
    assert vit.num_prefix_tokens == prefix
    torch.manual_seed(0)
    model = PromptedViT(vit, 4, [3, 0], kv_counts=[2, 4]).eval()
    with record_blocks(vit) as rec, torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()
    assert rec.lengths() == [prefix + 3 + vit.patch_embed.num_patches] * 2
    block = vit.blocks[1]  # the attention inside the block is the hand-computed one
    tokens = block.norm1(rec.inputs[1])
    key, value = model.kv_prompts(1)
    with torch.no_grad():
        assert torch.allclose(block.attn(tokens), _explicit(block.attn.attn, tokens, key, value, False), atol=1e-5)
    # fused (sdpa) and explicit attention agree; zero KV prompts are the family's own forward
    explicit_vit = build(fused_attn=False)
    torch.manual_seed(0)
    explicit = PromptedViT(explicit_vit, 4, [3, 0], kv_counts=[2, 4]).eval()
    bare = PromptedViT(build(), 4, [0, 0], kv_counts=[0, 0]).eval()
    with torch.no_grad():
        assert torch.allclose(explicit(x), logits, atol=1e-5)
        assert torch.equal(bare.forward_blocks(bare.embed(x)), bare.backbone.forward_features(x))
    model.train()
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 3])).backward()
    assert all(p.grad is not None for p in model.kv_prompts.parameters())
    assert all(p.grad is None for p in model.backbone.parameters())


def test_bad_kv_arguments(make_vit):
    with pytest.raises(ValueError, match=r"one KV prompt count per block \(4\)"):
        PromptedViT(make_vit(), 3, [0] * L, kv_counts=[1] * 3)
    with pytest.raises(ValueError, match="'middle'"):
        PromptedViT(make_vit(), 3, [0] * L, kv_counts=[1] * L, kv_position="middle")
    vit = make_vit()
    PromptedViT(vit, 3, [0] * L, kv_counts=[1] * L)
    with pytest.raises(ValueError, match="already carries KV prompts"):
        PromptedViT(vit, 3, [0] * L)  # would silently run the first model's KV prompts
    parallel = timm.create_model("vit_small_patch16_18x2_224", pretrained=False, num_classes=0, depth=1,
                                 embed_dim=48, num_heads=3, img_size=32)
    PromptedViT(parallel, 3, [2])  # no KV prompts: any block type is fine
    with pytest.raises(ValueError, match="block 0 is a ParallelThingsBlock"):
        PromptedViT(parallel, 3, [2], kv_counts=[1])


# ---------------------------------------------------------------- spec, job, CLI


BASE = {"name": "t", "space": {"num_prompts": {"int": [1, 8]}}}


def test_builtin_e2vpt_specs_validate(monkeypatch):
    demo = load_spec("demo_e2vpt")
    assert demo.method == "e2vpt" and demo.e2vpt.kv_shared and demo.e2vpt.kv_position == "prepend"
    assert demo.space.kv_prompts.int_range == (1, 8)
    assert demo.space.token_prune_ratio.choice and demo.e2vpt.prune_epochs == 1
    plain = load_spec("demo")
    assert (demo.backbone, demo.data) == (plain.backbone, plain.data)
    assert demo.train == plain.train
    monkeypatch.setenv("VTAB_ROOT", "/data/vtab-1k")
    paper = load_spec("search_spaces/e2vpt.yaml")
    assert paper.method == "e2vpt" and paper.data.root == "/data/vtab-1k" and len(paper.data.tasks) == 19
    assert paper.backbone.model == "vit_base_patch16_224.augreg_in21k" and paper.backbone.weights == "hub"
    assert (paper.train.batch_size, paper.train.epochs, paper.train.warmup_epochs) == (64, 100, 10)
    assert paper.space.base_lr.float_range == (0.05, 50) and paper.space.base_lr.log
    low, high = paper.space.kv_prompts.int_range
    assert low < 5 < high and paper.space.num_prompts.int_range[0] < 10 < paper.space.num_prompts.int_range[1]


@pytest.mark.parametrize("kv", [3, {"int": [0, 4]}])
def test_kv_prompts_with_method_vpt_is_an_error_naming_the_key(kv):
    raw = copy.deepcopy(BASE)
    raw["space"]["kv_prompts"] = kv
    with pytest.raises(SpecError, match=r"(?s)my\.yaml.*space\.kv_prompts needs `method: e2vpt`"):
        validate(raw, "my.yaml")
    assert validate({**raw, "method": "e2vpt"}).space.kv_prompts is not None
    assert validate({**BASE, "space": {**BASE["space"], "kv_prompts": 0}}).method == "vpt"


def test_e2vpt_section_is_strict_and_needs_its_method():
    with pytest.raises(SpecError, match="e2vpt.kv_shraed: Extra inputs"):
        validate({**BASE, "method": "e2vpt", "e2vpt": {"kv_shraed": False}})
    with pytest.raises(SpecError, match="e2vpt.kv_position"):
        validate({**BASE, "method": "e2vpt", "e2vpt": {"kv_position": "middle"}})
    with pytest.raises(SpecError, match="e2vpt options need `method: e2vpt`"):
        validate({**BASE, "e2vpt": {"kv_shared": False}})
    with pytest.raises(SpecError, match="method"):
        validate({**BASE, "method": "lora"})


def test_kv_prompts_reach_the_job_and_its_cost(tmp_path):
    spec = validate({**BASE, "method": "e2vpt", "backbone": {"model": "vit_base_patch16_224", "img_size": 224},
                     "space": {"num_prompts": 10, "kv_prompts": {"int": [1, 8]}},
                     "e2vpt": {"kv_shared": False, "kv_position": "append"}})
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    trial = study.ask()
    config = {**DefineByRun(spec.space)(trial), **trial.params}
    assert 1 <= config["kv_prompts"] <= 8
    for split in ("train800", "val200", "train800val200", "test"):  # a 10-class task folder (labels only)
        (tmp_path / f"{split}.txt").write_text("a.jpg 0\nb.jpg 9\n")
    job = make_job(spec, str(tmp_path), {**config, "kv_prompts": 5})
    e2vpt = get_method("e2vpt")
    assert job.method == "e2vpt" and e2vpt in job.methods()
    assert (e2vpt.settings(job).kv_shared, e2vpt.settings(job).kv_position) == (False, "append")
    assert e2vpt.kv_counts(job, 12) == [5] * 12 and job.counts(12) == [10] * 12
    cost = expected_cost(job)
    assert (cost.prompt_tokens, cost.kv_tokens) == (10, 5)
    assert cost.gflops == pytest.approx(18.51, abs=0.05)
    assert cost.trainable_params == 12 * 768 * (10 + 2 * 5) + 769 * 10  # separate K and V tensors


def test_cli_cost_with_kv_prompts_and_per_block_counts(capsys):
    assert main(["cost", "--prompts", "10", "--kv-prompts", "5"]) == 0
    out = capsys.readouterr().out
    assert "KV tokens        5 " in out and "prompt tokens    10 " in out and "18.51" in out
    assert main(["cost", "--counts", "10", "10", *["0"] * 10, "--kv-prompts", "5", "--kv-separate"]) == 0
    out = capsys.readouterr().out
    assert "[10, 10, 0, 0" in out and "prompt tokens    10 " in out and "18.51" in out
    assert f"{2 * 768 * 10 + 12 * 768 * 2 * 5:,}" in out
    assert main(["cost", "--counts", "1", "2", "3"]) == 2
    assert "one prompt count per block (12), got 3" in capsys.readouterr().err
