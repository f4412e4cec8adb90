"""``arkfed segment``: segmentation transfer, the dense-prediction test of a foundation model.

A U-Net-style decoder is trained on the backbone's multi-scale feature maps (timm
``features_only``, loaded with the model's backbone weights) over image/mask pairs, and scored
by Dice on held-out pairs. The encoder is ``finetuned`` (trains at a lower learning rate than
the decoder; the default, as in Ark's transfer experiments) or ``frozen`` (only the decoder
trains, so Dice measures what the features already hold).

Lung segmentation with a couple of hundred pairs saturates whatever the encoder, so the result
is a label-efficiency curve (:mod:`arkfed.evaluation.curves`): Dice at several training-set
sizes, for the model, the same architecture randomly initialised, and any ``--compare`` models,
over seeds that draw the same training pairs for every encoder. Each run trains a fixed number
of steps (not epochs: 5 pairs and 200 pairs get the same optimisation budget). The paired test
is the Wilcoxon signed-rank test over held-out images (per-image Dice averaged over seeds): it
asks whether the trained segmenters differ on the test population, so with tens of test images a
difference of a few thousandths of Dice can be "significant"; read it beside the difference
itself and the seed intervals, which carry the training-draw noise. The all-foreground mask's Dice is
reported as the trivial floor. Pairs are ``images/NAME.ext`` + ``masks/NAME.png`` (any mask
value > 127 is foreground).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from arkfed.errors import ArkfedError
from arkfed.model.ark import ArkModel

EncoderMode = Literal["frozen", "finetuned"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp")


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNetDecoder(nn.Module):
    """From the deepest feature map up: upsample to the next skip's size, concatenate, convolve.

    Works for any timm ``features_only`` encoder, including ones whose maps share a resolution
    (plain ViTs): upsampling to the skip's size is then the identity.
    """

    def __init__(self, channels: list[int], width: int = 32):
        super().__init__()
        deep_to_shallow = list(reversed(channels))
        self.first = _conv_block(deep_to_shallow[0], width)
        self.blocks = nn.ModuleList(_conv_block(width + c, width) for c in deep_to_shallow[1:])
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        feats = list(reversed(features))
        x = self.first(feats[0])
        for block, skip in zip(self.blocks, feats[1:]):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return F.interpolate(self.out(x), size=size, mode="bilinear", align_corners=False)


def create_encoder(model: ArkModel, random_init: bool = False, seed: int = 0) -> nn.Module:
    """timm ``features_only`` version of the model's architecture with the model's backbone weights
    (timm maps the plain backbone keys onto its feature wrapper); random weights if asked."""
    import timm

    spec = model.spec
    kwargs: dict = {"features_only": True}
    if not random_init:
        kwargs |= {"pretrained": True, "pretrained_cfg_overlay": dict(state_dict=model.backbone.state_dict())}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            try:
                return timm.create_model(spec.model, img_size=spec.img_size, **kwargs)
            except TypeError:  # CNNs take no img_size
                return timm.create_model(spec.model, **kwargs)
        except Exception as exc:
            raise ArkfedError(f"{spec.model!r} has no multi-scale feature maps for segmentation ({type(exc).__name__}: {exc})") from None


class Segmenter(nn.Module):
    def __init__(self, encoder: nn.Module, width: int = 32):
        super().__init__()
        self.encoder = encoder
        self.channels = list(encoder.feature_info.channels())
        self.decoder = UNetDecoder(self.channels, width)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.encoder(x)
        # some timm encoders (Swin, ...) return channels-last maps
        return [f.permute(0, 3, 1, 2) if f.shape[1] != c and f.shape[-1] == c else f for f, c in zip(feats, self.channels)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(x), x.shape[-2:])


def find_pairs(images_dir: Path, masks_dir: Path) -> list[tuple[Path, Path]]:
    """(image, mask) paths matched by file stem; images without a mask are an error naming one."""
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise ArkfedError(f"folder not found: {d}")
    masks = {p.stem: p for p in masks_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ArkfedError(f"{images_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    missing = [p for p in images if p.stem not in masks]
    if missing:
        raise ArkfedError(f"{missing[0]}: no mask named {missing[0].stem}.* in {masks_dir} ({len(missing)} images lack masks)")
    return [(p, masks[p.stem]) for p in images]


def load_pairs(pairs: list[tuple[Path, Path]], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images ``N x 1 x S x S`` and float masks ``N x 1 x S x S`` (0/1), resized to ``size``."""
    from PIL import Image

    from arkfed.data.imageio import read_image

    images, masks = [], []
    for image_path, mask_path in pairs:
        image, mask = read_image(image_path), read_image(mask_path)
        if image.shape != mask.shape:
            raise ArkfedError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} px but its image is {image.shape[1]}x{image.shape[0]}")
        images.append(np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR)))
        soft = np.asarray(Image.fromarray(((mask > 127) * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR))
        masks.append(soft > 127)
    return (torch.from_numpy(np.stack(images)).unsqueeze(1),
            torch.from_numpy(np.stack(masks).astype(np.float32)).unsqueeze(1))


def dice_scores(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image Dice of binary masks (1 when both are empty)."""
    pred, target = pred.flatten(1).float(), target.flatten(1).float()
    inter = (pred * target).sum(1)
    total = pred.sum(1) + target.sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1e-8), torch.ones_like(total))


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()


@dataclass
class SegmentSettings:
    img_size: int = 96
    steps: int = 40
    batch_size: int = 8
    lr: float = 1e-3
    encoder_lr_scale: float = 0.1
    width: int = 32
    train_fraction: float = 0.8
    limit: int | None = None
    encoder: EncoderMode = "finetuned"
    train_sizes: tuple[int | None, ...] = (5, 10, 20, None)
    seeds: tuple[int, ...] = (0, 1)
    n_boot: int = 1000
    correction: str = "holm"
    device: str = "cpu"
    flip: bool = False  # lungs are not left-right symmetric in their details; off by default


def train_segmenter(net: Segmenter, images: torch.Tensor, masks: torch.Tensor, train_encoder: bool, settings: SegmentSettings,
                    seed: int = 0) -> list[float]:
    """BCE + soft Dice for ``settings.steps`` steps over reshuffled passes of the pairs; the
    frozen encoder stays in eval mode (its BatchNorm too). Returns the loss of every step."""
    for p in net.encoder.parameters():
        p.requires_grad_(train_encoder)
    groups = [{"params": net.decoder.parameters(), "lr": settings.lr}]
    if train_encoder:
        groups.append({"params": net.encoder.parameters(), "lr": settings.lr * settings.encoder_lr_scale})
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    n = len(images)
    batch = min(settings.batch_size, n)
    order: list[int] = []
    losses = []
    net.train()
    if not train_encoder:
        net.encoder.eval()
    for _ in range(settings.steps):
        if len(order) < batch:
            order += rng.permutation(n).tolist()
        rows, order = torch.tensor(order[:batch]), order[batch:]
        x, y = images[rows].to(settings.device), masks[rows].to(settings.device)
        logits = net(x)
        loss = F.binary_cross_entropy_with_logits(logits, y) + soft_dice_loss(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def predict_masks(net: Segmenter, images: torch.Tensor, batch_size: int, device: str) -> torch.Tensor:
    net.eval()
    return torch.cat([net(images[i:i + batch_size].to(device)).cpu() > 0 for i in range(0, len(images), batch_size)])


def split_pairs(images_dir: Path, masks_dir: Path, settings: SegmentSettings) -> tuple[list, list]:
    """(training pool, held-out test pairs): a fixed shuffle (seed 0) so every seed and every
    encoder is scored on the same test images."""
    pairs = find_pairs(images_dir, masks_dir)
    order = np.random.default_rng(0).permutation(len(pairs))
    if settings.limit:
        order = order[: settings.limit]
    n_train = int(round(settings.train_fraction * len(order)))
    if n_train < 2 or len(order) - n_train < 1:
        raise ArkfedError(f"{images_dir}: {len(order)} pairs are too few to split into training and test images")
    return [pairs[i] for i in order[:n_train]], [pairs[i] for i in order[n_train:]]


def mean_dice_ci(per_image: np.ndarray, n_boot: int, seed: int = 0) -> list[float] | None:
    """Percentile-bootstrap 95% CI of the mean Dice, resampling test images."""
    from arkfed.evaluation.evaluate import bootstrap_weights, percentile_interval

    if n_boot <= 0 or len(per_image) < 2:
        return None
    reps = np.concatenate([(w @ per_image) / w.sum(1) for w in bootstrap_weights(np.arange(len(per_image)), n_boot, seed)])
    return percentile_interval(reps, n_boot)


def segmentation_curve(models: dict[str, ArkModel], images_dir: Path, masks_dir: Path, settings: SegmentSettings) -> dict:
    """Dice on the held-out pairs per encoder, training-set size and seed, summarised as curves.

    ``models`` maps a name to a model; ``"model"`` is the one under test and its architecture,
    randomly initialised, is added as ``"random"``. Every model sees its own normalisation.
    """
    from arkfed.data.loaders import Normalise
    from arkfed.evaluation.curves import RANDOM, REFERENCE, size_label, subset_rows, summarise_curves
    from arkfed.evaluation.linear_probe import random_init_seed

    if REFERENCE not in models:
        raise ArkfedError("segmentation_curve needs the model under test under the name 'model'")
    pool, test = split_pairs(images_dir, masks_dir, settings)
    raw_train, train_y = load_pairs(pool, settings.img_size)
    raw_test, test_y = load_pairs(test, settings.img_size)
    sizes = list(settings.train_sizes)
    inits = [REFERENCE, RANDOM, *(n for n in models if n != REFERENCE)]
    records, per_case, losses = [], {}, {}
    for init in inits:
        model = models.get(init, models[REFERENCE])
        norm = Normalise(model.spec.mean, model.spec.std)
        train_x, test_x = norm(raw_train.repeat(1, 3, 1, 1)), norm(raw_test.repeat(1, 3, 1, 1))
        for size in sizes:
            label = size_label(size)
            dice_rows = []
            for seed in settings.seeds:
                rows = torch.from_numpy(subset_rows(len(pool), size, seed))
                x, y = train_x[rows], train_y[rows]
                if settings.flip:
                    x, y = torch.cat([x, x.flip(-1)]), torch.cat([y, y.flip(-1)])
                torch.manual_seed(seed)
                encoder = create_encoder(model, random_init=init == RANDOM, seed=random_init_seed(seed))
                net = Segmenter(encoder, settings.width).to(settings.device)
                run_losses = train_segmenter(net, x, y, train_encoder=settings.encoder == "finetuned", settings=settings, seed=seed)
                dice = dice_scores(predict_masks(net, test_x, settings.batch_size, settings.device), test_y).numpy()
                dice_rows.append(dice)
                records.append({"init": init, "size": label, "seed": seed, "score": float(dice.mean()), "train_size": int(len(rows))})
                losses[f"{init}/{label}/{seed}"] = [run_losses[0], run_losses[-1]]
            per_case[(init, label)] = np.stack(dice_rows)
    curve = summarise_curves(records, sizes, "Dice", per_case, settings.correction, unit="training pairs")
    for (init, label), d in per_case.items():
        curve["inits"][init][label]["bootstrap_ci"] = mean_dice_ci(d.mean(0), settings.n_boot)
    return {
        "images": str(images_dir), "masks": str(masks_dir), "img_size": settings.img_size, "encoder": settings.encoder,
        "train_pool": len(pool), "test_pairs": len(test), "steps": settings.steps, "seeds": list(settings.seeds),
        "trivial_dice": float(dice_scores(torch.ones_like(test_y), test_y).mean()),
        "foreground_fraction": float(test_y.mean()),
        "bootstrap": {"resamples": settings.n_boot, "unit": "image", "of": "mean Dice over seeds, per test image"},
        "curve": curve, "runs": records, "loss_first_last": losses,
    }
