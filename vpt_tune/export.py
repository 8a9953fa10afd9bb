"""Export a trained trial as one small file, and load it back as a model for inference.

The file holds what was trained (prompts, segment masks, KV prompts, head: never the backbone), the
trial's job description (backbone name, image size, prompt layout) and its metrics. Loading
rebuilds the frozen backbone from the same weights setting (or a file given by the user), then the
prompted model with the trained tensors, in eval mode.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from vpt_tune.data.tasks import Preprocess
from vpt_tune.errors import UserError
from vpt_tune.models.backbone import normalisation
from vpt_tune.models.prompted_vit import PromptedViT
from vpt_tune.search.results import PROMPTS_ARTIFACT, STATE_FILE, TRAIN_RUNS
from vpt_tune.train.job import CHECKPOINT_FILE, Job, build_model

FORMAT = "vpt-tune-trial/1"


def export_trial(experiment: str | Path, table_row: dict, out: str | Path) -> Path:
    """Write the trial of ``table_row`` (a row of the trial table of ``experiment``) to ``out``."""
    if table_row.get("status") != "finished":
        raise UserError(f"trial {table_row.get('trial_id')} is {table_row.get('status')}, not finished; export a "
                        "finished trial (`vpt-tune pareto EXPERIMENT --all` lists them)")
    saved = _trained_state(Path(experiment), table_row)
    job = Job.from_dict(saved["job"])
    metrics = {k: float(v) for k, v in saved["metrics"].items() if isinstance(v, (int, float))}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "job": asdict(job), "classes": int(saved["trainable"]["head.weight"].shape[0]),
                "trainable": saved["trainable"], "metrics": metrics, "task": table_row.get("task")}, out)
    return out


def _trained_state(experiment: Path, table_row: dict) -> dict:
    """The trial's final checkpoint: from the experiment's Train runs, else (their folder removed or not
    copied along) from the copy logged to the trial's MLflow run, which every Pareto trial has."""
    checkpoint = experiment / (table_row.get("checkpoint") or "-") / CHECKPOINT_FILE
    if checkpoint.is_file():
        return torch.load(checkpoint, weights_only=True)
    run_id, state = table_row.get("mlflow_run_id"), experiment / STATE_FILE
    uri = json.loads(state.read_text()).get("mlflow_uri") if run_id and state.is_file() else None
    if uri and uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        uri = None  # a store left on another machine: MLflow would create an empty one here
    if uri:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        with tempfile.TemporaryDirectory() as folder:
            try:
                copy = MlflowClient(uri).download_artifacts(run_id, f"{PROMPTS_ARTIFACT}/{CHECKPOINT_FILE}", folder)
                return torch.load(copy, weights_only=True)
            except (MlflowException, OSError):
                pass
    raise UserError(f"trial {table_row.get('trial_id')}: no {checkpoint} and no {PROMPTS_ARTIFACT}/{CHECKPOINT_FILE} "
                    f"in its MLflow run {run_id or '(none)'} at {uri or '(no MLflow store found)'}; export it where "
                    f"the experiment's {TRAIN_RUNS}/ folder or its MLflow store is intact (MLflow keeps the prompts "
                    "of Pareto trials only)")


def load(path: str | Path, weights: str | None = None, device: str | torch.device = "cpu") -> PromptedViT:
    """The model exported to ``path``, ready for inference (eval mode). ``weights``: a local backbone
    weights file, instead of the exported trial's setting (``demo``, ``hub`` or its file).

    ``model.preprocess`` turns PIL images into the model's input batch exactly as the trial's evaluation
    prepared its images (:class:`vpt_tune.data.tasks.Preprocess`; on the CPU: move it to ``device``)::

        model = vpt_tune.load("best.pt")
        predicted = model(model.preprocess([Image.open(p) for p in paths])).argmax(-1)
    """
    try:
        saved = torch.load(path, weights_only=True)
    except (FileNotFoundError, RuntimeError, OSError) as err:
        raise UserError(f"{path}: cannot read an exported trial ({err})") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise UserError(f"{path}: not a file written by `vpt-tune export`")
    job = Job.from_dict(saved["job"])
    model = build_model(job, saved["classes"], weights).load_trainable(saved["trainable"]).to(device).eval()
    model.preprocess = Preprocess(job.benchmark, job.img_size, *normalisation(model.backbone))
    return model
