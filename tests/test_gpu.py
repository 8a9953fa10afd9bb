"""The GPU path's correctness (`pytest -m cuda`, run by bench/gpu_check.py): every test runs on the CPU
too where the code path exists there, and on CUDA when a device is present (skipped otherwise, with the
reason). Tolerances follow the compared magnitudes: bf16 keeps 8 significant bits (relative 2^-8 per
rounding), fp32 about 2^-23."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import make_split
from torch.nn.attention import SDPBackend, sdpa_kernel

from vpt_tune.condense import prompt_importance
from vpt_tune.models.prompted_vit import PromptedViT
from vpt_tune.prune import gate_importance
from vpt_tune.train.prefix_cache import cached_prefix

pytestmark = pytest.mark.cuda
NO_CUDA = "no CUDA device here (bench/gpu_check.py runs these on a GPU machine)"


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> torch.device:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip(NO_CUDA)
    return torch.device(request.param)


def _model(make_vit, device, prompts=5, kv=0, placement_from=0, classes=10) -> PromptedViT:
    vit = make_vit()
    counts = [0 if i < placement_from else prompts for i in range(len(vit.blocks))]
    torch.manual_seed(3)
    return PromptedViT(vit, classes, counts, 0.0, [kv] * len(vit.blocks)).to(device)


def _scale(reference: torch.Tensor) -> float:
    return float(reference.detach().abs().max())


@pytest.mark.parametrize("kv", [0, 3])
def test_bf16_autocast_matches_fp32(make_vit, images, device, kv):
    model = _model(make_vit, device, prompts=5, kv=kv)
    x = images.to(device)
    logits = model(x)
    grads = torch.autograd.grad(logits.square().sum(), list(model.prompts.tokens.values()))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        low = model(x)
    low_grads = torch.autograd.grad(low.float().square().sum(), list(model.prompts.tokens.values()))
    # a few dozen bf16 roundings along 4 blocks: within 5 % of the logits' scale
    assert (low.float() - logits).abs().max() <= 0.05 * _scale(logits)
    for g, lg in zip(grads, low_grads):
        assert torch.isfinite(lg).all()
        assert torch.nn.functional.cosine_similarity(g.flatten(), lg.float().flatten(), dim=0) > 0.98


BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("kv", [0, 3])
def test_every_sdpa_backend_gives_the_reference_logits_at_odd_lengths(make_vit, images, device, backend, kv):
    """17 image tokens + 6 prompts = 23 (+3 KV prompts: 26 keys): no multiple of 8."""
    reference_model = _model(make_vit, torch.device("cpu"), prompts=6, kv=kv).double()
    reference = reference_model(images.double())
    model = _model(make_vit, device, prompts=6, kv=kv)
    half = device.type == "cuda"  # flash and memory-efficient kernels on CUDA run in bf16, as trials do
    try:
        with sdpa_kernel([BACKENDS[backend]]), torch.autocast(device.type, torch.bfloat16, enabled=half):
            logits = model(images.to(device)).double().cpu()
    except RuntimeError as err:
        if any(m in str(err) for m in ("No available kernel", "No viable backend", "not supported")):
            pytest.skip(f"{backend} attention is not available on {device.type}: {str(err).splitlines()[0]}")
        raise
    tolerance = (0.05 if half else 1e-5) * _scale(reference)
    assert (logits - reference).abs().max() <= tolerance


def test_prefix_cache_on_the_device_gives_the_uncached_logits(make_vit, device):
    model = _model(make_vit, device, prompts=4, placement_from=2).eval()
    split = make_split(torch.randint(0, 255, (6, 3, 32, 32), dtype=torch.uint8), torch.arange(6) % 2)
    net, (cached,) = cached_prefix(model, [split], 4, device, store=None)
    assert net is not model  # the cache is in use: blocks 0-1 run once
    with torch.no_grad():
        index = torch.arange(6)
        expected = model(split.inputs(index).to(device))
        got = net(cached.inputs(index).to(device))
    assert (got - expected).abs().max() <= 1e-5 * _scale(expected)


def test_condensation_and_pruning_scores_are_finite_and_rank_as_on_the_cpu(make_vit, device):
    """A constructed case: prompt p of each block scaled by (p + 1), so importance grows with p."""
    split = make_split(torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8) % 2)
    rankings = {}
    for where in (torch.device("cpu"), device):
        model = _model(make_vit, where, prompts=6, kv=2)
        with torch.no_grad():
            for p in model.prompts.tokens.values():
                p.mul_(torch.arange(1, 7, device=where, dtype=p.dtype)[:, None] * 4)
        scores = prompt_importance(model, model, split, 4, where)
        gates = gate_importance(model, model, split, 4, where)
        assert all(torch.isfinite(s).all() for s in scores.values())
        assert all(torch.isfinite(torch.as_tensor(s)).all() for s in (gates.tokens, gates.segments))
        rankings[where.type] = [s.argsort().tolist() for s in scores.values()]
    assert rankings["cpu"] == rankings[device.type]


def test_a_checkpoint_saved_on_the_device_loads_on_the_cpu_and_back(make_vit, images, device):
    model = _model(make_vit, device, prompts=3, kv=2)
    buffer = io.BytesIO()
    torch.save(model.trainable_state(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, map_location="cpu", weights_only=True)
    assert all(t.device.type == "cpu" for t in state.values())
    on_cpu = _model(make_vit, torch.device("cpu"), prompts=3, kv=2)
    torch.manual_seed(99)
    on_cpu.reset_parameters().load_trainable(state)
    expected = model(images.to(device)).detach().cpu()
    assert (on_cpu(images) - expected).abs().max() <= 1e-5 * _scale(expected)
    back = _model(make_vit, device, prompts=3, kv=2).load_trainable(
        {k: v.to(device) for k, v in on_cpu.trainable_state().items()})
    assert torch.equal(back(images.to(device)), model(images.to(device)))
