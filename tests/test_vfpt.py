"""VFPT: Fourier prompts are VPT prompts of which the first fraction enters as the real part of their FFT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vpt_tune.condense import condense_
from vpt_tune.cost import ViTShape, prompted_cost
from vpt_tune.data.demo import materialise
from vpt_tune.methods import get_method
from vpt_tune.models.fourier_prompts import FourierPrompts, fourier_transform
from vpt_tune.models.prompted_vit import PromptedViT
from vpt_tune.spec import SpecError, validate
from vpt_tune.train.job import Job, expected_cost, run

CPU = torch.device("cpu")
BASE = {"name": "t", "space": {"num_prompts": {"int": [1, 8]}}}


def _reference(prompts: torch.Tensor, dims: str) -> torch.Tensor:
    """numpy's FFT in float64: the real part over (prompts, channels), channels or prompts."""
    x = prompts.double().numpy()
    out = {"all": np.fft.fft2(x, axes=(-2, -1)), "hidden": np.fft.fft(x, axis=-1), "sequence": np.fft.fft(x, axis=-2)}
    return torch.from_numpy(out[dims].real)


@pytest.mark.parametrize("dims", ["all", "hidden", "sequence"])
def test_the_fourier_part_equals_an_explicit_fft(dims):
    prompts = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    transformed = FourierPrompts([3, 0], dims)(0, prompts)
    assert torch.allclose(transformed[:, :3], _reference(prompts[:, :3], dims), rtol=0, atol=1e-12 * 48 * 5)
    assert torch.equal(transformed[:, 3:], prompts[:, 3:])  # the others enter as they are
    assert torch.equal(FourierPrompts([3, 0], dims)(1, prompts), prompts)  # a block without Fourier prompts
    with pytest.raises(ValueError, match="Fourier dims"):
        fourier_transform(prompts, "diagonal")


def _model(make_vit, fraction: float, counts=(4, 4, 0, 4)) -> PromptedViT:
    torch.manual_seed(0)
    model = PromptedViT(make_vit(), 3, list(counts)).eval()
    fourier = [int(c * fraction) for c in counts]
    model.prompt_transforms["vfpt"] = FourierPrompts(fourier)
    return model


def test_fraction_zero_is_vpt_exactly(make_vit, images):
    torch.manual_seed(0)
    vpt = PromptedViT(make_vit(), 3, [4, 4, 0, 4]).eval()
    assert torch.equal(_model(make_vit, 0.0)(images), vpt(images))
    assert not torch.equal(_model(make_vit, 0.5)(images), vpt(images))


def test_each_block_sees_its_fourier_prompts_first(make_vit, images, record_blocks):
    model = _model(make_vit, 0.5)
    with record_blocks(model.backbone) as rec:
        model(images)
    prefix = model.backbone.num_prefix_tokens
    for block in (0, 1, 3):
        prompts = model.prompts.tokens[str(block)].detach()
        seen = rec.inputs[block][:, prefix:prefix + 4]
        expected = torch.cat([_reference(prompts[None, :2], "all")[0].float(), prompts[2:]])
        scale = expected.abs().max()
        assert torch.allclose(seen, expected.expand_as(seen), rtol=0, atol=1e-5 * scale)


def test_condensation_keeps_the_kept_fourier_prompts_and_they_load_back(make_vit, images, record_blocks):
    model = _model(make_vit, 0.5)
    before = {b: model.prompts.tokens[str(b)].detach().clone() for b in (0, 1, 3)}
    condense_(model, {0: [1, 2, 3], 1: [2, 3], 3: [0, 1]})
    assert model.prompt_transforms["vfpt"].counts.tolist() == [1, 0, 0, 2]
    with record_blocks(model.backbone) as rec:
        logits = model(images)
    prefix = model.backbone.num_prefix_tokens
    seen = rec.inputs[0][0, prefix:prefix + 3]
    expected = torch.cat([_reference(before[0][None, 1:2], "all")[0].float(), before[0][2:]])
    assert torch.allclose(seen, expected, rtol=0, atol=1e-5 * expected.abs().max())
    loaded = _model(make_vit, 0.5).load_trainable(model.trainable_state())  # a fresh, uncondensed build
    assert loaded.prompt_transforms["vfpt"].counts.tolist() == [1, 0, 0, 2]
    assert torch.equal(loaded(images), logits)


def test_vfpt_costs_what_vpt_costs_and_the_flop_counter_agrees(make_vit):
    torch.manual_seed(0)
    vit = make_vit(fused_attn=False)
    model = PromptedViT(vit, 3, [4, 4, 0, 4]).eval()
    model.prompt_transforms["vfpt"] = FourierPrompts([2, 2, 0, 2])
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 32, 32))
    analytic = prompted_cost(ViTShape.of(vit), [4, 4, 0, 4], num_classes=3).gflops * 1e9
    assert analytic == pytest.approx(counter.get_total_flops() / 2, rel=0.01)


def test_the_spec_searches_the_fourier_fraction_with_method_vfpt_only():
    spec = validate({**BASE, "method": "vfpt", "space": {**BASE["space"], "fourier_fraction": {"float": [0, 1]}},
                     "vfpt": {"dims": "hidden"}})
    assert spec.space.fourier_fraction.float_range == (0, 1) and spec.vfpt.dims == "hidden"
    with pytest.raises(SpecError, match="space.fourier_fraction needs `method: vfpt`"):
        validate({**BASE, "space": {**BASE["space"], "fourier_fraction": 0.5}})
    with pytest.raises(SpecError, match=r"fourier_fraction must lie in \[0, 1\]"):
        validate({**BASE, "method": "vfpt", "space": {**BASE["space"], "fourier_fraction": 1.5}})
    with pytest.raises(SpecError, match="vfpt options need `method: vfpt`"):
        validate({**BASE, "vfpt": {"dims": "sequence"}})


def test_a_vfpt_job_trains_condenses_and_reports_vpt_costs(tmp_path):
    common = dict(model="vit_tiny_patch16_224", weights="random", img_size=32, epochs=1, batch_size=100,
                  task_dir=str(materialise("digits", tmp_path)), options={"condensation": {"epochs": 1}})
    params = {"num_prompts": 4, "placement": "deep", "base_lr": 0.1, "condensation_ratio": 0.5}
    job = Job(**common, method="vfpt", params={**params, "fourier_fraction": 0.5})
    assert {m.name for m in job.methods()} == {"vfpt", "condensation"}
    model, metrics = run(job, CPU)
    fourier = model.prompt_transforms["vfpt"].counts.tolist()
    assert sum(model.prompts.counts) == 24 and all(
        f <= c for f, c in zip(fourier, model.prompts.counts))
    assert {"val_acc", "val_acc_uncondensed"} <= set(metrics)
    vpt = Job(**common, params=params)
    assert expected_cost(job) == expected_cost(vpt)
    assert get_method("vfpt").settings(job).dims == "all"
