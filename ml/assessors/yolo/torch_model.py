"""YOLOv8 classification (ultralytics) as a plain torch network that returns one raw NOK logit.

The network is built from ultralytics' own ``yolov8-cls.yaml`` with ``parse_model`` and trained by
coilguard's loop, not by the ultralytics trainer: that is what gives class weights, NOK oversampling,
early stopping on the validation loss and, above all, no network access. The ultralytics trainer and
predictor are never used, so their online pieces (hub, font download, AMP check that fetches
``yolov8n.pt`` on CUDA) never run; importing ultralytics itself is made offline by :func:`ultralytics_offline`.

The paper views YOLOv8 as 10 major layers (9 backbone blocks and the ``Classify`` head) and freezes the
first k of them when fine-tuning; :meth:`YoloClassifier.freeze` does that, keeping the batch-norm layers
of frozen blocks in eval mode so that their running statistics stay the pretrained ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import nn

N_LAYERS = 10  # 9 backbone blocks + the Classify head
SIZES = ("n", "s")


def ultralytics_offline() -> Any:
    """Import ultralytics with nothing reaching the network, and return ``ultralytics.nn.tasks``.

    ``YOLO_OFFLINE`` makes ultralytics skip its DNS probe at import (its ``ONLINE`` flag is then False),
    and ``sync=False`` turns off its telemetry and error reporting. Fonts and the AMP check belong to the
    ultralytics trainer and plotting, which coilguard does not use.

    The import is quiet: on a fresh machine ultralytics announces the settings file it creates, with a link
    to its documentation, on stdout, in the middle of a demo or a worker's JSON log. Afterwards its
    warnings go to coilguard's logging instead of its own stdout handler (warnings during the import itself
    are dropped with the notice; its ``VERBOSE`` flag stays off, which only its own trainer reads).
    """
    os.environ["YOLO_OFFLINE"] = "True"  # "1" is ignored by releases that compare with "true"
    saved = {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "YOLO_VERBOSE")}
    os.environ["YOLO_VERBOSE"] = "False"
    try:
        from ultralytics.nn import tasks
        from ultralytics.utils import LOGGER, SETTINGS
    finally:
        # ultralytics sets OMP_NUM_THREADS=1 at import (for its training data loaders). Left in place, every
        # process started from ours afterwards (a worker, a benchmark's subprocess) would run torch on one
        # core: put the variables back as they were, whether or not the import worked.
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    if saved["YOLO_VERBOSE"] is None and not LOGGER.propagate:  # once, and not against the user's own choice
        for handler in list(LOGGER.handlers):
            LOGGER.removeHandler(handler)
        LOGGER.setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))  # as services/logs.py
        LOGGER.propagate = True

    with contextlib.suppress(Exception):  # a read-only settings file must not stop a model from loading
        if SETTINGS.get("sync"):
            SETTINGS.update(sync=False)
    return tasks


def yolov8_cls_yaml(size: str, nc: int = 1, channels: int = 1) -> dict[str, Any]:
    """The packaged ``yolov8-cls.yaml`` at scale ``size``, read straight from the ultralytics package
    (no file search, no download)."""
    if size not in SIZES:
        raise ValueError(f"YOLOv8 size must be one of {SIZES}, got {size!r}")
    ultralytics_offline()
    import ultralytics
    from ultralytics.utils import YAML

    path = Path(ultralytics.__file__).parent / "cfg" / "models" / "v8" / "yolov8-cls.yaml"
    cfg = dict(YAML.load(path))
    cfg.update(nc=nc, scale=size, channels=channels, yaml_file=f"yolov8{size}-cls.yaml")
    return cfg


class YoloClassifier(nn.Module):
    """YOLOv8{n,s}-cls on a 1-channel (grayscale) image → one logit per image.

    ``self.model`` is ultralytics' ``nn.Sequential`` of the 10 layers, so state-dict keys are the same
    as in an ultralytics ``yolov8s-cls.pt`` checkpoint (``model.0.conv.weight`` …). The ``Classify``
    head returns softmax probabilities in eval mode, which for one class are always 1, so the forward
    pass runs the head's parts itself and returns the raw logit in every mode.
    """

    def __init__(self, size: str = "s", channels: int = 1) -> None:
        super().__init__()
        tasks = ultralytics_offline()
        cfg = yolov8_cls_yaml(size, nc=1, channels=channels)
        self.size = size
        self.model, _ = tasks.parse_model(deepcopy(cfg), ch=channels, verbose=False)
        self.frozen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.model[:-1]:
            x = layer(x)
        head = self.model[-1]
        return head.linear(head.drop(head.pool(head.conv(x)).flatten(1))).squeeze(1)

    def freeze(self, k: int) -> list[nn.Parameter]:
        """Freeze the first ``k`` of the 10 layers; return the parameters that still train."""
        if not 0 <= k < N_LAYERS:
            raise ValueError(f"freeze must be in [0, {N_LAYERS - 1}], got {k}")
        self.frozen = k
        for i, layer in enumerate(self.model):
            for p in layer.parameters():
                p.requires_grad_(i >= k)
        self.train(self.training)
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> YoloClassifier:
        super().train(mode)
        for layer in self.model[: self.frozen]:
            layer.eval()  # frozen blocks keep their batch-norm statistics
        return self

    def load_pretrained(self, path: str | Path) -> dict[str, Any]:
        """Copy the weights of a YOLOv8-cls checkpoint on disk (``yolov8s-cls.pt`` as ultralytics ships
        it, or a plain state dict) into this network; never downloads.

        A 3-channel first convolution is summed over its input channels, which is exactly the same as
        feeding it the gray image replicated into R, G and B. The class layer is taken only when its
        shape fits (an ImageNet checkpoint has 1000 classes; here there is one logit).

        The file is unpickled (ultralytics checkpoints hold the model object): load only files you trust.
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"YOLO weights file {path} does not exist (nothing is downloaded)")
        ultralytics_offline()
        data = path.read_bytes()  # hashed and loaded from the same bytes: the manifest names what was used
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        if isinstance(obj, dict) and isinstance(obj.get("ema") or obj.get("model"), nn.Module):
            obj = obj.get("ema") or obj.get("model")
        state = obj.state_dict() if isinstance(obj, nn.Module) else obj
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds neither an ultralytics checkpoint nor a state dict")
        own = self.state_dict()
        head_linear = f"model.{N_LAYERS - 1}.linear."
        loaded, skipped = {}, []
        for key, value in state.items():
            if key not in own or not torch.is_tensor(value):
                continue
            value = value.float()
            if key == "model.0.conv.weight" and value.shape[1] == 3 and own[key].shape[1] == 1:
                value = value.sum(dim=1, keepdim=True)  # gray replicated to RGB, folded into the weights
            if value.shape == own[key].shape:
                loaded[key] = value.to(own[key].dtype)
            elif key.startswith(head_linear):
                skipped.append(key)
            else:
                raise ValueError(
                    f"{path}: {key} has shape {tuple(value.shape)}, yolov8{self.size}-cls needs {tuple(own[key].shape)}"
                    " (is it a checkpoint of another size?)"
                )
        missing = [k for k in own if k not in loaded and not k.startswith(head_linear)]
        if missing:
            raise ValueError(f"{path} is not a yolov8{self.size}-cls checkpoint: {len(missing)} tensors missing")
        self.load_state_dict(loaded, strict=False)
        sha256 = hashlib.sha256(data).hexdigest()
        return {"file": str(path), "sha256": sha256, "tensors": len(loaded), "skipped": skipped}
