"""``contrastive_seg``: a defect segmenter (encoder–decoder CNN, residual + SE blocks, skip connections)
trained with ComboLoss and, when ``contrastive``, the proposal-contrastive InfoNCE term of the
contrastive defect-segmentation paper (λ = 0.1, τ = 0.1); ``contrastive=False`` is the paper's baseline.

The encoder is EfficientNet-Lite0 with its ImageNet weights by default (``encoder="effnet_lite0"``):
on the magnetic tiles, 130 training images were too few for the paper's encoder trained from scratch
(``encoder="residual_se"``, still available), which reached pooled IoU 0.36–0.46 where the pretrained
one reaches 0.64–0.67 (docs/benchmarks.md).

Training needs pixel masks: an :class:`~ml.imagesets.ImageSet` with ``masks`` (coil matrices have
none, so a coil dataset is refused). Images are resized to ``image_size`` and standardized (zero mean,
unit spread: tiles differ in exposure more than defects in contrast); each step trains on whole images
flipped at random, or, with ``crop_size``, on random crops, most of them centred on a defect pixel.
Whole images are the default: on the magnetic tiles crops learned far more slowly (their batch-norm
statistics differ from the whole images seen at inference). ``val_fraction`` of the images is held
out for early stopping on the validation IoU, and for choosing the pixel threshold that maximizes it;
with ``val_split="near_copies"`` the held-out images are whole groups of near-copies (several shots of
one tile), so both are chosen on tiles the network has not seen.

``keep_aspect``: a square resize squashes a 600-px-wide shot about 2.5 times more across than a 200-px-wide
one, so the same surface texture reaches the network at different shapes. With it, each image is scaled
so its short side is ``image_size`` (one scale, no distortion), the network trains on one random
``image_size`` square of it per step, and predicts on half-overlapping squares whose probabilities are
averaged. Off by default: on the magnetic tiles it lifted the wide uneven-grinding shots of one grouped
split and cost the small defects on all three splits tried (docs/benchmarks.md). ``aspect_limit`` keeps
the aspect only of shots longer than that ratio (e.g. 1.8: the wide ones) and squashes the rest as
without it, so the small defects of ordinary shots stay in every training step. ``aspect_defect_share``
centres that share of the training squares of a defect shot whose aspect is kept on one of its defect
pixels (nnU-Net's foreground oversampling), so a small defect is not left outside the square. Both stay
off: on a second model seed neither could be told apart from ``keep_aspect`` alone (docs/benchmarks.md).

``members``: that many networks, member k fitted exactly as a one-network assessor of seed ``seed + k`` is
(its own validation split, initialization and batches), their p(defect) maps averaged before the
threshold. Seeds differ most on the small defects, and no seed can be picked in advance; their average
errs less than they do on average: on the paper's split four seeds averaged reached pooled IoU 0.666
where each alone averaged 0.643, level with the best seed (docs/benchmarks.md, ``bench/tile_grid.py
--average``, which measures the same average). The members' pixel and image
thresholds, each chosen on its own held-out images, are averaged too: no image is held out from all of
them. It costs ``members`` times the training and the prediction; 1 (one network) by default.

``ema``: the weights validated each epoch, and kept, are an exponential moving average of the training
steps' weights (batch-norm statistics included) instead of the last step's. The epoch is chosen on a
few validation images, and the seeds' figures on the magnetic tiles differ mostly through that choice
and the small defects; an average moves less between epochs.

Inference: sigmoid probabilities at ``image_size``, resized back to the image, thresholded, and
connected components smaller than ``min_object_px`` (at ``image_size`` scale) removed, as the paper's
``remove_small_objects``. A coil's raw p(NOK) comes from the predicted defect area a (share of its
worst image) as a / (a + ``area_scale``): 0.5 when the defect covers ``area_scale`` of the image.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from scipy import ndimage
from torch import nn

from ml.assessors.base import Assessor, AssessorSettings, FitCallback, FitReport, Stopwatch, calibrate
from ml.assessors.contrastive_seg.loss import combo_loss, proposal_contrastive_loss
from ml.assessors.contrastive_seg.torch_model import ContrastiveSegNet, Encoder, SeedMean, size_multiple
from ml.assessors.pixel_map import PixelMapAssessor
from ml.evaluation.metrics import binary_metrics, youden_threshold
from ml.imagesets.base import ImageSet
from ml.imagesets.folder import as_image_set, image_set_summary, resize_image, resize_mask
from ml.imagesets.near_copies import group_holdout, near_copy_groups
from ml.training.loop import EarlyStopping, weight_average
from ml.training.runtime import fit_runtime, resolve_device, seed_everything

THRESHOLD_GRID = np.round(np.arange(0.2, 0.81, 0.05), 2)
MAX_ASPECT = 8  # with keep_aspect, the longest side an image is resized to, in multiples of image_size


class ContrastiveSegSettings(AssessorSettings):
    ignored: ClassVar[dict[str, str]] = {
        "class_weight_nok": "its loss is per pixel (0.3·BCE + 0.7·Dice), not per image",
        "oversample_nok": "every image is seen once an epoch",
        "threshold_rule": "its coil threshold is Youden's J on the validation split (or the defect area)",
        "min_threshold": "its coil threshold is Youden's J on the validation split (or the defect area)",
    }

    epochs: int = Field(40, ge=1, le=500)
    batch_size: int = Field(8, ge=1, le=256)
    patience: int = Field(10, ge=1)
    contrastive: bool = Field(True, description="add the InfoNCE branch (False: the paper's CNN baseline)")
    contrastive_weight: float = Field(0.1, ge=0, description="λ of the InfoNCE term")
    temperature: float = Field(0.1, gt=0, description="τ of the InfoNCE term")
    contrastive_samples: int = Field(256, ge=8, le=8192, description="pixels sampled per class and batch")
    proj_dim: int = Field(64, ge=4, le=512, description="embedding size of the projection head")
    bce_weight: float = Field(0.3, ge=0, description="α of ComboLoss")
    dice_weight: float = Field(0.7, ge=0, description="β of ComboLoss")
    width: int = Field(32, ge=4, le=128, description="channels of the finest decoder (and encoder) level; paper: 32")
    depth: int = Field(4, ge=2, le=5, description="encoder stages (paper: 4, then the bottleneck; residual_se only)")
    encoder: Encoder = Field(
        "effnet_lite0",
        description="EfficientNet-Lite0 with ImageNet weights, or the paper's from scratch (residual_se)",
    )
    freeze: int = Field(2, ge=0, le=7, description="effnet_lite0: stem and first stages kept at ImageNet weights")
    encoder_lr: float = Field(
        0.1, gt=0, le=1, description="the encoder's learning rate as a share of lr (pretrained layers move less)"
    )
    image_size: int = Field(128, ge=32, le=1024, description="images are resized to this square side")
    crop_size: int = Field(0, ge=0, le=1024, description="training crop side (0: the whole image, the default)")
    defect_crop_share: float = Field(0.7, ge=0, le=1, description="training crops centred on a defect pixel")
    jitter: float = Field(0.0, ge=0, le=1, description="training gain and offset jitter (± this, standardized units)")
    zoom: float = Field(0.0, ge=0, lt=1, description="training zoom: a random square of side ≥ 1 − zoom, resized")
    steps_per_epoch: int = Field(0, ge=0, description="batches per epoch (0: one pass over the training images)")
    pixel_threshold: float = Field(0.5, gt=0, lt=1, description="used when tune_threshold is off")
    tune_threshold: bool = Field(True, description="pick the pixel threshold maximizing validation IoU")
    keep_aspect: bool = Field(False, description="short side to image_size, squares along the long side (no squash)")
    aspect_limit: float = Field(
        1.0, ge=1, description="keep_aspect: only shots longer than this ratio keep it; the others are squashed square"
    )
    aspect_defect_share: float = Field(
        0.0, ge=0, le=1, description="keep_aspect: training squares of a long shot centred on a defect pixel"
    )
    val_split: Literal["images", "near_copies"] = Field(
        "images", description="validation images drawn one by one, or whole groups of near-copies (shots of one tile)"
    )
    flip_average: bool = Field(False, description="average p(defect) over the image and its three flips")
    ema: float = Field(
        0.0, ge=0, lt=1, description="decay per step of a moving average of the weights, validated and kept (0: off)"
    )
    members: int = Field(
        1, ge=1, le=8, description="networks from seeds seed, seed+1, …, each fitted as its own; p(defect) averaged"
    )
    min_object_px: int = Field(8, ge=0, description="smaller predicted components are removed (image_size scale)")
    area_scale: float = Field(0.002, gt=0, lt=1, description="defect area share that maps to raw p(NOK) = 0.5")


class ContrastiveSegAssessor(PixelMapAssessor):
    key = "contrastive_seg"
    Settings = ContrastiveSegSettings
    quick_settings: ClassVar[dict[str, Any]] = {
        "epochs": 2,
        "width": 4,
        "depth": 2,
        "image_size": 32,
        "crop_size": 0,
        "batch_size": 4,
        "proj_dim": 8,
    }

    def __init__(self, settings=None, *, name: str | None = None) -> None:
        super().__init__(settings, name=name)
        s = self.s
        multiple = size_multiple(s.encoder, s.depth)
        if s.image_size % multiple or s.crop_size % multiple:
            raise ValueError(f"image_size and crop_size must be multiples of {multiple} for the {s.encoder} encoder")
        if s.crop_size > s.image_size:
            raise ValueError("crop_size cannot exceed image_size")
        if s.keep_aspect and s.crop_size:
            raise ValueError("keep_aspect trains on image_size squares already: leave crop_size at 0")
        self.net: ContrastiveSegNet | SeedMean | None = None
        self.pixel_threshold = s.pixel_threshold

    @property
    def s(self) -> ContrastiveSegSettings:
        return self.settings  # type: ignore[return-value]

    def build_network(self, pretrained: bool = False) -> ContrastiveSegNet | SeedMean:
        """``pretrained`` loads the ImageNet weights into an ``effnet_lite0`` encoder (for a fresh fit; a
        saved model brings its own). With ``members``, their :class:`SeedMean` (for loading a saved one)."""
        s = self.s
        if s.members > 1:
            return SeedMean([self._member(k).build_network(pretrained) for k in range(s.members)])
        return ContrastiveSegNet(
            s.width,
            s.depth,
            s.proj_dim,
            s.encoder,
            image_size=s.image_size,
            freeze=s.freeze,
            pretrained=pretrained,
        )

    # ------------------------------------------------------------------ training

    def fit(
        self,
        dataset: ImageSet | Any,
        init: Assessor | None = None,
        device: str = "auto",
        callback: FitCallback | None = None,
    ) -> FitReport:
        if self.s.members > 1:
            return self._fit_members(dataset, init, device, callback)
        clock = Stopwatch()
        s = self.s
        if not isinstance(dataset, ImageSet) or dataset.masks is None:
            raise ValueError(
                f"the {self.key} assessor trains on defect masks: give it an ImageSet with masks "
                "(e.g. ml.imagesets.magnetic_tile.load_magnetic_tile); coil matrices have no masks"
            )
        images = as_image_set(dataset)
        rng = seed_everything(s.seed)
        generator = torch.Generator().manual_seed(s.seed)
        torch_device = resolve_device(device)
        if s.val_split == "near_copies":
            train_idx, val_idx = group_holdout(near_copy_groups(images.images), s.val_fraction, rng)
        else:
            order = rng.permutation(len(images))
            n_val = max(1, round(len(images) * s.val_fraction))
            val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
        if len(train_idx) == 0:
            raise ValueError("too few images to hold out a validation split")
        net = self.build_network(pretrained=init is None)
        if init is not None:
            init = self.warm_start_source(init)
            net.load_state_dict(init.net.state_dict())
        x = self._inputs(images.images)
        y = as_batch([resize_mask(m, self.model_shape(m.shape)) for m in images.masks])
        history, best_epoch = self._train(net, x, y, train_idx, val_idx, rng, generator, torch_device, callback)
        self.net = net.cpu().eval()
        self._calibrate(images, x, y, val_idx)
        self.training_data = {
            **image_set_summary(images),
            "n_train": len(train_idx),
            "n_val": len(val_idx),
            "validation_images": [images.names[i] for i in val_idx],
        }
        self.runtime = fit_runtime(
            torch_device,
            clock.seconds,
            epochs_run=len(history),
            best_epoch=best_epoch,
            history=history,
            start="init" if init is not None else ("imagenet" if s.encoder == "effnet_lite0" else "scratch"),
        )
        return FitReport(self.metrics, len(history), clock.seconds, str(torch_device))

    def warm_start_source(self, init: Assessor) -> ContrastiveSegAssessor:
        """Also refuse a champion of several members for another number of them (a one-network champion
        warm-starts every member)."""
        init = super().warm_start_source(init)
        if isinstance(init.net, SeedMean) and len(init.net.members) != self.s.members:
            raise TypeError(f"cannot warm-start {self.s.members} member(s) from {init.describe()}")
        return init

    def _member(self, k: int) -> ContrastiveSegAssessor:
        """Member ``k`` as a one-network assessor of its own seed: fitted that way, it is the network
        ``bench/tile_grid.py --average`` measured for that seed."""
        seed = (self.s.seed + k) % 2**63  # a seed just under the settings' bound still gives every member one
        return type(self)({**self.s.model_dump(), "members": 1, "seed": seed}, name=self.name)

    def _fit_members(
        self, dataset: ImageSet | Any, init: Assessor | None, device: str, callback: FitCallback | None
    ) -> FitReport:
        """Fit each member as its own assessor, then serve them as one; warm-started (ReTrain) member by member
        from a champion with as many, or every member from a one-network champion."""
        clock = Stopwatch()
        sources: list[Assessor | None] = [None] * self.s.members
        if init is not None:
            init = self.warm_start_source(init)
            nets = list(init.net.members) if isinstance(init.net, SeedMean) else [init.net] * self.s.members
            sources = []
            for k, net in enumerate(nets):
                source = self._member(k)
                source.net = net
                sources.append(source)
        members = []
        for k, source in enumerate(sources):
            member = self._member(k)
            member.fit(dataset, init=source, device=device, callback=callback)
            members.append(member)
        self.net = SeedMean([m.net for m in members]).eval()  # type: ignore[misc]
        self.pixel_threshold = float(np.mean([m.pixel_threshold for m in members]))
        self.threshold = float(np.mean([m.threshold for m in members]))
        validation = [m.metrics["validation"] for m in members]
        # a member whose held-out images were all of one class has no image-level figures: average those that do
        numeric = {k for v in validation for k, x in v.items() if isinstance(x, int | float)}
        self.metrics = {
            "validation": {
                **{k: float(np.mean([v[k] for v in validation if k in v])) for k in sorted(numeric)},
                "pixel_threshold": self.pixel_threshold,
                "members": validation,  # each on its own held-out images; the figures above are their mean
            }
        }
        self.training_data = {
            **members[0].training_data,
            **{k: [m.training_data[k] for m in members] for k in ("n_train", "n_val", "validation_images")},
        }
        runs = [m.runtime for m in members]
        torch_device = resolve_device(device)
        self.runtime = fit_runtime(
            torch_device,
            clock.seconds,
            epochs_run=sum(r["epochs_run"] for r in runs),
            best_epoch=runs[0]["best_epoch"],
            history=[],
            start=runs[0].get("start"),
            members=runs,  # best_epoch above is member 0's; each member's own, with its history, is here
        )
        return FitReport(self.metrics, self.runtime["epochs_run"], clock.seconds, str(torch_device))

    def _train(
        self,
        net: ContrastiveSegNet,
        x: np.ndarray,
        y: np.ndarray,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        rng: np.random.Generator,
        generator: torch.Generator,
        device: torch.device,
        callback: FitCallback | None,
    ) -> tuple[list[dict[str, float]], int]:
        s = self.s
        net.to(device)
        rest = [p for name, p in net.named_parameters() if not name.startswith("encoder.")]
        opt = torch.optim.Adam(
            [{"params": net.encoder.parameters(), "lr": s.lr * s.encoder_lr}, {"params": rest}], lr=s.lr
        )
        # cosine decay to 5 % of each group's rate: the late epochs settle instead of jumping between masks
        # (the validation IoU is noisy)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.05 + 0.475 * (1 + np.cos(np.pi * e / s.epochs)))
        steps = s.steps_per_epoch or int(np.ceil(len(train_idx) / s.batch_size))
        averaged = weight_average(net, s.ema)
        kept = averaged.module if averaged is not None else net  # the weights validated, and kept at the end
        stopping, history = EarlyStopping(kept, s.patience, min_delta=1e-4), []  # on -IoU: higher is better
        for epoch in range(1, s.epochs + 1):
            net.train()
            losses, contrast = [], []
            perm = np.resize(rng.permutation(train_idx), steps * s.batch_size)
            for step in range(steps):
                idx = perm[step * s.batch_size : (step + 1) * s.batch_size]
                xb, yb = self._crops(x[idx], y[idx], rng)
                xb, yb = xb.to(device), yb.to(device)
                logits, z = net.forward_train(xb)
                loss = combo_loss(logits, yb, s.bce_weight, s.dice_weight)
                if s.contrastive and s.contrastive_weight > 0:
                    c = proposal_contrastive_loss(z, yb, s.temperature, s.contrastive_samples, generator)
                    loss = loss + s.contrastive_weight * c
                    contrast.append(c.item())
                opt.zero_grad()
                loss.backward()
                opt.step()
                if averaged is not None:
                    averaged.update_parameters(net)
                losses.append(loss.item())
            schedule.step()
            val_loss, val_iou = self._validate(kept, x[val_idx], y[val_idx], device)
            row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss, "val_iou": val_iou}
            if contrast:
                row["train_contrastive"] = float(np.mean(contrast))
            history.append(row)
            if callback is not None:
                callback({"assessor": self.name, "epochs": s.epochs, "val_f1": None, **row})
            if stopping.should_stop(epoch, -val_iou):
                break
        stopping.restore_best()
        if kept is not net:
            net.load_state_dict(kept.state_dict())
        return history, stopping.best_epoch

    def _crops(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Training crops (most centred on a defect pixel) or, with ``keep_aspect``, a square along the long
        side (centred on a defect pixel for ``aspect_defect_share`` of the defect shots, else at random);
        flipped at random when ``augment``."""
        s = self.s
        crop = s.crop_size or s.image_size
        xs, ys = np.empty((len(x), crop, crop), np.float32), np.empty((len(x), crop, crop), np.float32)
        for k in range(len(x)):
            h, w = x[k].shape
            if crop < min(h, w):
                centred = y[k].any() and rng.random() < s.defect_crop_share
            else:  # keep_aspect: a square shot has no room; a long one may centre its square on a defect
                centred = h != w and s.aspect_defect_share > 0 and y[k].any() and rng.random() < s.aspect_defect_share
            if centred:
                rows, cols = np.nonzero(y[k])
                j = rng.integers(len(rows))
                r = int(np.clip(rows[j] - crop // 2 + rng.integers(-crop // 4, crop // 4 + 1), 0, h - crop))
                c = int(np.clip(cols[j] - crop // 2 + rng.integers(-crop // 4, crop // 4 + 1), 0, w - crop))
            elif h == w:  # both offsets in one draw, as every recorded run drew them
                r, c = (int(v) for v in rng.integers(0, h - crop + 1, 2))
            else:  # keep_aspect: the short side is the square's, so only the long side has room
                offset = int(rng.integers(0, max(h, w) - crop + 1))
                r, c = (offset, 0) if h > w else (0, offset)
            xi, yi = x[k][r : r + crop, c : c + crop], y[k][r : r + crop, c : c + crop]
            if s.augment:
                xi, yi = self._augment(xi, yi, rng)
            xs[k], ys[k] = xi, yi
        return torch.from_numpy(xs[:, None]), torch.from_numpy(ys[:, None])

    def _augment(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Flips; with ``zoom`` a random square resized back (the tiles come at many scales); with ``jitter``
        a random gain and offset (exposure varies from tile to tile). Nothing that turns the vertical
        machining texture sideways."""
        s = self.s
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[:, ::-1]
        if rng.random() < 0.5:
            x, y = x[::-1], y[::-1]
        size = x.shape[0]
        side = round(size * rng.uniform(1 - s.zoom, 1)) if s.zoom else size
        if side < size:
            r, c = (int(v) for v in rng.integers(0, size - side + 1, 2))
            x = resize_image(x[r : r + side, c : c + side], size, clip=False)
            y = resize_mask(y[r : r + side, c : c + side] > 0.5, size)
        if s.jitter:
            x = x * rng.uniform(1 - s.jitter, 1 + s.jitter) + rng.uniform(-s.jitter, s.jitter)
        return x, y

    def _validate(self, net: nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device) -> tuple[float, float]:
        """Validation ComboLoss and pooled IoU at probability 0.5, on the whole resized images (the loss pools
        all pixels, as it does a batch's)."""
        prob = self._maps(net, x, device)
        target = torch.from_numpy(np.concatenate([t.ravel() for t in y]).astype(np.float32))
        logits = torch.logit(torch.from_numpy(np.concatenate([p.ravel() for p in prob])).clamp(1e-6, 1 - 1e-6))
        loss = float(combo_loss(logits, target, self.s.bce_weight, self.s.dice_weight))
        return loss, pooled_iou(y, [p >= 0.5 for p in prob])

    def model_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The (H, W) an image of ``shape`` is resized to: the square, or with ``keep_aspect`` (for shots longer
        than ``aspect_limit``) the short side at ``image_size`` and the long side in proportion."""
        size = self.s.image_size
        h, w = shape[:2]
        if not self.s.keep_aspect or max(h, w) <= self.s.aspect_limit * min(h, w):
            return size, size
        # the long side at most MAX_ASPECT squares: a 16 × 250,000 strip (4 Mpx, a few kB as a PNG) became
        # 128 × 2,000,000, 31,000 squares and gigabytes, and a 1-pixel strip ran the worker out of memory
        longest = MAX_ASPECT * size
        return min(longest, max(size, round(h * size / min(h, w)))), min(
            longest, max(size, round(w * size / min(h, w)))
        )

    def _inputs(self, images: list[np.ndarray]) -> np.ndarray:
        """The images resized and standardized: an (N, S, S) array, or with ``keep_aspect`` one of objects."""
        if not self.s.keep_aspect:
            return standardize(np.stack([resize_image(im, self.s.image_size) for im in images]))
        return as_batch([standardize(resize_image(im, self.model_shape(im.shape))) for im in images])

    def _maps(self, net: nn.Module, x: np.ndarray, device: torch.device) -> np.ndarray | list[np.ndarray]:
        """p(defect) per pixel of each prepared image; with ``keep_aspect`` the mean over half-overlapping
        ``image_size`` squares (the network only ever sees squares of one scale)."""
        size = self.s.image_size
        if not self.s.keep_aspect:
            return self._probabilities(net, x, device)
        out: list[np.ndarray] = [None] * len(x)  # type: ignore[list-item]
        square = [k for k, image in enumerate(x) if image.shape == (size, size)]
        if square:  # one batch for the shots squashed square (all of them below aspect_limit)
            for k, p in zip(square, self._probabilities(net, np.stack([x[k] for k in square]), device), strict=True):
                out[k] = p
        for k, image in enumerate(x):
            if out[k] is not None:
                continue
            h, w = image.shape
            rows, cols = _starts(h, size), _starts(w, size)
            squares = np.stack([image[r : r + size, c : c + size] for r in rows for c in cols])
            prob = self._probabilities(net, squares, device)
            total, count = np.zeros((h, w), np.float32), np.zeros((h, w), np.float32)
            for p, (r, c) in zip(prob, [(r, c) for r in rows for c in cols], strict=True):
                total[r : r + size, c : c + size] += p
                count[r : r + size, c : c + size] += 1
            out[k] = total / count
        return out

    def _probabilities(self, net: nn.Module, x: np.ndarray, device: torch.device) -> np.ndarray:
        """p(defect) per pixel; with ``flip_average`` the mean over the image and its flips, each flipped
        back (the tiles' defects have no preferred side, and the four views disagree mostly at edges)."""
        net.eval()
        views = ((), (-1,), (-2,), (-2, -1)) if self.s.flip_average else ((),)
        out = []
        with torch.no_grad():
            for b in torch.from_numpy(x[:, None]).split(16):
                b = b.to(device)
                prob = sum(torch.sigmoid(net(b.flip(dims))).flip(dims) for dims in views) / len(views)
                out.append(prob.cpu().numpy()[:, 0])
        return np.concatenate(out)

    def _calibrate(self, images: ImageSet, x: np.ndarray, y: np.ndarray, val_idx: np.ndarray) -> None:
        s = self.s
        assert self.net is not None
        prob = self._maps(self.net, x[val_idx], torch.device("cpu"))
        if s.tune_threshold:
            ious = [pooled_iou(y[val_idx], self._postprocess(prob, t)) for t in THRESHOLD_GRID]
            self.pixel_threshold = float(THRESHOLD_GRID[int(np.argmax(ious))])
        pred = self._postprocess(prob, self.pixel_threshold)
        scores = np.array([self._area_score(p) for p in pred])
        y_img = images.nok[val_idx].astype(int)
        metrics: dict[str, Any] = {"pixel_threshold": self.pixel_threshold, **segmentation_metrics(y[val_idx], pred)}
        if 0 < y_img.sum() < len(y_img):
            self.threshold = float(np.clip(youden_threshold(y_img, scores), 1e-4, 1 - 1e-4))
            metrics.update(binary_metrics(y_img, calibrate(scores, self.threshold)))
        else:
            self.threshold = 0.5  # a predicted area of area_scale is the boundary
        self.metrics = {"validation": metrics}

    # ------------------------------------------------------------------ inference

    def _postprocess(self, prob: np.ndarray, threshold: float, min_px: float | None = None) -> np.ndarray:
        """Threshold and drop small connected components, per map of a (N, H, W) or (H, W) array."""
        min_px = self.s.min_object_px if min_px is None else min_px
        if isinstance(prob, list):
            return [self._postprocess(p, threshold, min_px) for p in prob]
        if prob.ndim == 3:
            return np.stack([self._postprocess(p, threshold, min_px) for p in prob])
        mask = prob >= threshold
        if min_px > 0 and mask.any():
            labels, n = ndimage.label(mask)
            sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
            keep = np.r_[False, sizes >= min_px]
            mask = keep[labels]
        return mask

    def _area_score(self, mask: np.ndarray) -> float:
        area = float(mask.mean())
        return area / (area + self.s.area_scale)

    def probability_maps(self, images: list[np.ndarray], original_size: bool = True) -> list[np.ndarray]:
        """p(defect) per pixel, at each image's own size (or at ``image_size``)."""
        if self.net is None:
            raise RuntimeError(f"{self.key} assessor has not been fitted or loaded")
        if not images:
            return []
        prob = self._maps(self.net, self._inputs(images), torch.device("cpu"))
        return [resize_image(p, im.shape) if original_size else p for p, im in zip(prob, images, strict=True)]

    def segment(self, images: list[np.ndarray], threshold: float | None = None) -> list[np.ndarray]:
        """Boolean defect masks at each image's own size (small components removed, scaled to that size), at the
        model's pixel threshold or at ``threshold`` (to see what another would give)."""
        return self.masks(self.probability_maps(images), images, threshold)

    def masks(
        self, maps: list[np.ndarray], images: list[np.ndarray], threshold: float | None = None
    ) -> list[np.ndarray]:
        """:meth:`segment` from maps already computed by :meth:`probability_maps` (one inference, many thresholds)."""
        threshold = self.pixel_threshold if threshold is None else threshold
        out = []
        for prob, image in zip(maps, images, strict=True):
            scale = image.shape[0] * image.shape[1] / np.prod(self.model_shape(image.shape))
            out.append(self._postprocess(prob, threshold, self.s.min_object_px * scale))
        return out

    def image_scores(self, images: list[np.ndarray]) -> np.ndarray:
        """Raw p(NOK) per image from the predicted defect area (at ``image_size``)."""
        probs = self.probability_maps(images, original_size=False)
        return np.array([self._area_score(self._postprocess(p, self.pixel_threshold)) for p in probs])


def standardize(x: np.ndarray) -> np.ndarray:
    """Each image of an (N, H, W) or (H, W) array to zero mean and unit spread: tiles differ in exposure far
    more than defects in contrast."""
    mean = x.mean(axis=(-2, -1), keepdims=True)
    std = x.std(axis=(-2, -1), keepdims=True)
    return ((x - mean) / (std + 0.02)).astype(np.float32)


def as_batch(arrays: list[np.ndarray]) -> np.ndarray:
    """Arrays of one shape stacked; of several shapes, a 1-D array of objects (fancy indexing works on both)."""
    if len({a.shape for a in arrays}) <= 1:
        return np.stack(arrays)
    out = np.empty(len(arrays), dtype=object)
    for k, a in enumerate(arrays):
        out[k] = a
    return out


def _starts(length: int, size: int) -> list[int]:
    """Offsets of ``size`` windows covering ``length``, half-overlapping, the last flush with the end."""
    if length <= size:
        return [0]
    return [int(v) for v in np.linspace(0, length - size, int(np.ceil((length - size) / (size / 2))) + 1).round()]


def pooled_iou(truth: np.ndarray | list[np.ndarray], pred: np.ndarray | list[np.ndarray]) -> float:
    """IoU over all pixels of all images together (the paper's confusion matrix is pooled)."""
    tp = sum(int(np.sum(t & p)) for t, p in zip(truth, pred, strict=True))
    union = sum(int(np.sum(t | p)) for t, p in zip(truth, pred, strict=True))
    return tp / union if union else 1.0


def segmentation_metrics(truth: list[np.ndarray] | np.ndarray, pred: list[np.ndarray] | np.ndarray) -> dict[str, Any]:
    """Pooled pixel IoU, Dice, precision and recall, plus the per-image mean IoU and Dice."""
    tp = fp = fn = 0
    ious, dices = [], []
    for t, p in zip(truth, pred, strict=True):
        t, p = np.asarray(t, bool), np.asarray(p, bool)
        a, b, c = int(np.sum(t & p)), int(np.sum(~t & p)), int(np.sum(t & ~p))
        tp, fp, fn = tp + a, fp + b, fn + c
        if a + b + c:
            ious.append(a / (a + b + c))
            dices.append(2 * a / (2 * a + b + c))
        else:
            ious.append(1.0)
            dices.append(1.0)
    return {
        "iou": tp / max(tp + fp + fn, 1),
        "dice": 2 * tp / max(2 * tp + fp + fn, 1),
        "precision": tp / max(tp + fp, 1),
        "recall": tp / max(tp + fn, 1),
        "mean_iou": float(np.mean(ious)) if ious else 0.0,
        "mean_dice": float(np.mean(dices)) if dices else 0.0,
        "confusion": {"tp": tp, "fp": fp, "fn": fn},
    }
