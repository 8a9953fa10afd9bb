"""Reference points (METHODS.md, "Reference points on a front" and "SSF"): linear probe, SSF, full fine-tuning.

What trains, what a run changes, what a checkpoint holds, and their cost: 0 prompt tokens whatever the
spec's prompt entries, the plain backbone's GFLOPs (checked against torch's FLOP counter) and their
trainable parameters, expected before training as the built model reports them.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError
from torch.utils.flop_counter import FlopCounterMode

from vpt_tune.cost import ViTShape, prompted_cost
from vpt_tune.methods import METHODS, REFERENCES
from vpt_tune.methods.full import FullOptions
from vpt_tune.methods.linear import LinearOptions
from vpt_tune.methods.ssf import SSFOptions
from vpt_tune.models.ssf import merge_ssf_, ssf_modules, ssf_parameter_count
from vpt_tune.train.job import Job, build_model, expected_cost, model_cost, run

CLASSES = 10
HEAD = {"head.weight", "head.bias"}
HEAD_PARAMS = (192 + 1) * CLASSES  # vit_tiny: width 192


def _job(method: str, task_dir: str = "", model: str = "vit_tiny_patch16_224", img_size: int = 32, **fields) -> Job:
    # the spec's prompt entries still reach a reference's jobs: they must be ignored
    params = {"num_prompts": 4, "placement": "deep", "base_lr": 0.1}
    return Job(model=model, weights="random", img_size=img_size, task_dir=task_dir, epochs=1, batch_size=100,
               method=method, params=params, **fields)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    from vpt_tune.data.demo import materialise

    return str(materialise("digits", tmp_path_factory.mktemp("references")))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _plain_gflops(job: Job) -> float:
    shape = ViTShape.for_model(job.model, job.img_size)
    return prompted_cost(shape, [0] * shape.depth, CLASSES).gflops


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, tensor in before.items() if not torch.equal(tensor, after[name])}


def test_the_references_are_registered_apart_from_the_main_methods_and_import_no_torch():
    assert REFERENCES == ("linear", "ssf", "full")
    for name in REFERENCES:
        method = METHODS[name]
        assert method.reference and not method.main and method.space == {} and method.summary
        assert method.used(_job(name)) and not method.used(_job("vpt"))
        assert [m.name for m in _job(name).methods()] == [name]
    code = "import sys, vpt_tune.methods; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


@pytest.mark.parametrize("options, default", [(LinearOptions, [0.05, 0.2, 1.0]), (SSFOptions, [0.02, 0.1, 0.5]),
                                              (FullOptions, [0.001, 0.005, 0.02])], ids=REFERENCES)
def test_options_keep_a_non_empty_positive_lr_grid(options, default):
    assert options().base_lrs == default
    assert options(base_lrs=[0.3]).base_lrs == [0.3]
    for bad in ([], [0.1, -0.01], [0.0]):
        with pytest.raises(ValidationError, match="base_lrs"):
            options(base_lrs=bad)
    name = next(n for n in REFERENCES if METHODS[n].options is options)
    with pytest.raises(ValidationError, match="base_lrs"):  # a job checks the options it is given
        _job(name, options={name: {"base_lrs": []}})


def test_linear_probe_trains_only_the_head(digits):
    job = _job("linear", digits)
    fresh = build_model(job, CLASSES)
    assert _trainable(fresh) == HEAD
    assert sum(fresh.prompts.counts) == 0 and fresh.first_prompted_block == 12  # the whole backbone is a cached prefix
    before = {k: t.clone() for k, t in fresh.state_dict().items()}
    model, metrics = run(job, torch.device("cpu"))
    after = model.state_dict()
    assert not _changed({k: t for k, t in before.items() if k.startswith("backbone.")}, after)
    assert _changed(before, after) == HEAD
    assert set(model.trainable_state()) == HEAD
    cost = expected_cost(job, classes=CLASSES)
    assert cost == model_cost(model, job)
    assert cost.prompt_tokens == metrics["prompt_tokens"] == 0 and cost.kv_tokens == 0
    assert cost.trainable_params == metrics["trainable_params"] == HEAD_PARAMS
    assert cost.gflops == _plain_gflops(job) < expected_cost(_job("vpt"), classes=CLASSES).gflops


def _randomise(model, seed: int) -> None:
    """SSF pairs and head far from their initial values: a state that differs from a freshly built model's."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pair in ssf_modules(model.backbone):
            pair.scale.copy_(1 + 0.2 * torch.randn(pair.scale.shape, generator=gen))
            pair.shift.copy_(0.2 * torch.randn(pair.shift.shape, generator=gen))
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=gen))


def test_ssf_at_identity_is_the_linear_probe_and_only_its_pairs_and_the_head_train(images):
    job = _job("ssf")
    model, probe = build_model(job, CLASSES).eval(), build_model(_job("linear"), CLASSES).eval()
    pairs = ssf_modules(model.backbone)
    assert len(pairs) == 2 + 6 * 12
    assert not torch.equal(model(images), probe(images))  # the authors' init is not the identity
    with torch.no_grad():
        for pair in pairs:
            pair.scale.fill_(1.0)
            pair.shift.zero_()
    assert torch.equal(model(images), probe(images))  # same seed: same backbone and head
    ssf = {f"backbone.{name}" for name, _ in model.backbone.named_parameters() if ".ssf." in name}
    assert len(ssf) == 2 * len(pairs)
    assert _trainable(model) == ssf | HEAD
    state = model.trainable_state()
    assert {k for k in state if k.startswith("backbone.")} == ssf  # no frozen backbone weight
    assert model.first_prompted_block == 0 and METHODS["ssf"].first_block(job, 12) == 0


def test_an_ssf_state_loads_into_a_fresh_model_with_identical_logits(images):
    job = _job("ssf")
    trained = build_model(job, CLASSES).eval()
    _randomise(trained, seed=3)
    state = trained.trainable_state()
    fresh = build_model(job, CLASSES).eval()
    assert not torch.equal(fresh(images), trained(images))
    assert fresh.load_trainable(state) is fresh
    assert torch.equal(fresh(images), trained(images))


def test_an_ssf_run_trains_the_pairs_and_head_and_leaves_the_backbone(digits):
    job = _job("ssf", digits)
    before = {k: t.clone() for k, t in build_model(job, CLASSES).state_dict().items()}
    model, metrics = run(job, torch.device("cpu"))
    changed = _changed(before, model.state_dict())
    assert changed == set(model.trainable_state())  # every pair and the head moved, nothing else
    assert len(changed) == 2 * (2 + 6 * 12) + 2
    assert metrics["prompt_tokens"] == 0 and metrics["gflops"] == _plain_gflops(job)


def test_ssf_cost_is_the_plain_backbones_with_its_pairs_trainable():
    job = _job("ssf")
    model = build_model(job, CLASSES)
    cost = expected_cost(job, classes=CLASSES)
    assert cost == model_cost(model, job)
    assert cost.prompt_tokens == 0 and cost.gflops == _plain_gflops(job)
    count = ssf_parameter_count(model.backbone)
    assert count == 2 * (2 * 192 + 12 * (7 * 192 + 768))  # 2 per channel: patch proj, final norm, 11·D per block
    assert cost.trainable_params == count + HEAD_PARAMS == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_full_fine_tuning_trains_every_parameter(digits):
    job = _job("full", digits)
    fresh = build_model(job, CLASSES)
    assert all(p.requires_grad for p in fresh.parameters())
    assert fresh.first_prompted_block == 0 and METHODS["full"].first_block(job, 12) == 0
    before = {k: t.clone() for k, t in fresh.state_dict().items()}
    model, metrics = run(job, torch.device("cpu"))
    backbone = {f"backbone.{name}" for name, _ in model.backbone.named_parameters()}
    assert _changed(before, model.state_dict()) == backbone | HEAD  # every tensor moved in one epoch
    assert set(model.trainable_state()) == backbone | HEAD
    total = sum(p.numel() for p in model.parameters())
    assert metrics["trainable_params"] == total and metrics["prompt_tokens"] == 0
    assert metrics["gflops"] == _plain_gflops(job)


@pytest.mark.parametrize("model_name, img_size", [("vit_tiny_patch16_224", 32), ("vit_small_patch14_reg4_dinov2", 28)],
                         ids=["vit", "dinov2-reg4"])
def test_full_cost_counts_the_built_backbone_before_it_is_built(model_name, img_size):
    # read off the architecture on the meta device; dinov2: registers, layer scale, a resized position table
    job = _job("full", model=model_name, img_size=img_size)
    model = build_model(job, CLASSES)
    cost = expected_cost(job, classes=CLASSES)
    assert cost == model_cost(model, job)
    assert cost.trainable_params == sum(p.numel() for p in model.parameters())
    assert cost.trainable_params == sum(p.numel() for p in model.backbone.parameters()) + (model.head.in_features + 1) * CLASSES
    assert cost.prompt_tokens == 0 and cost.gflops == _plain_gflops(job)


@pytest.mark.parametrize("method", REFERENCES)
def test_gflops_match_the_flop_counter(method, images):
    job = _job(method)
    model = build_model(job, CLASSES).eval()
    if method == "ssf":  # deployed merged: the elementwise scale and shift are gone
        model = copy.deepcopy(model)
        merge_ssf_(model.backbone)
        assert not ssf_modules(model.backbone)
    for block in model.backbone.blocks:
        block.attn.fused_attn = False  # FlopCounterMode does not see fused attention on CPU
    with FlopCounterMode(display=False) as counter:  # (its module tracker needs autograd on)
        model(images[:1])
    analytic = expected_cost(job, classes=CLASSES).gflops * 1e9
    assert analytic == pytest.approx(counter.get_total_flops() / 2, rel=0.01)  # torch counts 2 per multiply-add
