"""Runtime of exported FedSeg MONAI bundles that combine several networks: copied into <bundle>/scripts/.

Imports only torch and MONAI, so a bundle runs where FedSeg is not installed. `python -m monai.bundle run`
puts the bundle root on sys.path before it runs, so configs name these classes as
``scripts.fedseg_bundle.<Class>``. Every class returns class probabilities computed exactly as FedSeg's
engine does at inference: per network a sliding-window pass over the whole z-scored image (gaussian
blending of logits), then the softmax.

The FedSM selector (SelectorNet, selector_input) is defined here only, so that a bundle carries it verbatim;
fedseg.methods.fedsm imports it from here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch import nn


class SlidingWindowSoftmax(nn.Module):
    """One network's class probabilities over a whole image, as FedSeg's SegEngine.predict_probs computes them."""

    def __init__(self, roi_size: Sequence[int], sw_batch_size: int = 4, overlap: float = 0.25):
        super().__init__()
        self.roi_size = [int(r) for r in roi_size]
        self.sw_batch_size = int(sw_batch_size)
        self.overlap = float(overlap)

    def probs(self, net: nn.Module, image: torch.Tensor) -> torch.Tensor:
        logits = sliding_window_inference(
            image,
            roi_size=self.roi_size,
            sw_batch_size=self.sw_batch_size,
            predictor=net,
            overlap=self.overlap,
            mode="gaussian",
        )
        return torch.softmax(logits.float(), dim=1)


class MeanSoftmaxEnsemble(SlidingWindowSoftmax):
    """FedCross / FedCrossEns: the mean of the K members' softmax (each member its own sliding-window pass).

    `member` is one instantiated network; the ensemble holds `num_members` copies of it (members.<i>.*),
    whose weights the bundle's models/model.pt sets.
    """

    def __init__(
        self, member: nn.Module, num_members: int, roi_size: Sequence[int], sw_batch_size: int = 4, overlap: float = 0.25
    ):
        super().__init__(roi_size, sw_batch_size, overlap)
        if int(num_members) < 1:
            raise ValueError(f"num_members must be >= 1, got {num_members}")
        self.members = nn.ModuleList(copy.deepcopy(member) for _ in range(int(num_members)))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.probs(net, image) for net in self.members]).mean(dim=0)


# ---- FedSM super model -------------------------------------------------------------------------------------
Z_CLIP = 5.0  # view 1: z-scores clipped to +-5 SD, then / 5
LOG_RANGE = 1e4  # view 2: sign(x) log1p(|x|) / log1p(1e4), clipped to [-1, 1]
DETAIL_CLIP = 1.0  # view 3: |z - box3(z)| clipped to [0, 1] SD


class SelectorNet(nn.Module):
    """FedSM's site classifier: strided conv blocks (conv 3x3 stride 2 -> norm -> ReLU), global average
    pooling, one linear layer. Its one definition (fedseg.methods.fedsm trains this class).

    norm is GroupNorm in every case, so a sample is normalised on its own (independent of the batch: gradient
    accumulation in chunks is exact, and no running statistics of single-site batches are averaged): "group"
    (default; channels // 8 groups, so the feature maps' relative levels, and with them the intensity cues that
    tell scanners apart, survive), "layer" (one group), "instance" (one group per map: removes exactly those
    cues), "none"."""

    def __init__(self, num_sites: int, spatial_dims: int, in_channels: int, channels: Sequence[int], norm: str = "group"):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        layers: list[nn.Module] = []
        width = int(in_channels)
        for c in (int(c) for c in channels):
            layers.append(conv(width, c, kernel_size=3, stride=2, padding=1))
            if norm != "none":
                groups = {"group": max(1, c // 8), "instance": c, "layer": 1}[norm]
                layers.append(nn.GroupNorm(groups, c))
            layers.append(nn.ReLU(inplace=True))
            width = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, int(num_sites))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled features: what the head classifies (and what the "lda" protocol's statistics summarise)."""
        return self.features(x).flatten(2).mean(dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def selector_input(image_raw: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, *spatial) intensities as stored -> (B, 3C, size, ...): appearance, intensity and detail views."""
    raw = image_raw.float()
    dims = tuple(range(1, raw.ndim))
    mean = raw.mean(dim=dims, keepdim=True)
    std = raw.std(dim=dims, keepdim=True)
    z = (raw - mean) / torch.where(std > 0, std, torch.ones_like(std))
    pool = F.avg_pool2d if raw.ndim == 4 else F.avg_pool3d
    detail = (z - pool(z, kernel_size=3, stride=1, padding=1, count_include_pad=False)).abs().clamp(0, DETAIL_CLIP)
    appearance = z.clamp(-Z_CLIP, Z_CLIP) / Z_CLIP
    intensity = (torch.sign(raw) * torch.log1p(raw.abs()) / math.log1p(LOG_RANGE)).clamp(-1, 1)

    def resize(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(int(size),) * (x.ndim - 2), mode="area")

    return torch.cat([resize(appearance), resize(intensity), resize(detail / DETAIL_CLIP)], dim=1)


class FedSMSuperModel(SlidingWindowSoftmax):
    """FedSM's super model: per image q = softmax(selector(views of the stored intensities)); when max q >
    gamma the predicted site's personalized model segments the image, else the global model.

    forward(image, image_raw): `image` z-scored as the engine feeds the segmenters, `image_raw` as stored
    (the bundle's preprocessing copies it before normalizing). `segmenter` is one instantiated network, copied
    for the global model (global_model.*) and each site (personalized.<site>.*); the selector is selector.*.
    The last batch's choices are in `last_routes` and printed, one line per image.
    """

    def __init__(
        self,
        segmenter: nn.Module,
        site_names: Sequence[str],
        gamma: float,
        spatial_dims: int,
        in_channels: int,
        selector_channels: Sequence[int],
        selector_norm: str,
        selector_input_size: int,
        roi_size: Sequence[int],
        sw_batch_size: int = 4,
        overlap: float = 0.25,
    ):
        super().__init__(roi_size, sw_batch_size, overlap)
        self.site_names = [str(s) for s in site_names]
        if not self.site_names:
            raise ValueError("site_names must not be empty")
        self.gamma = float(gamma)
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
        self.selector_input_size = int(selector_input_size)
        self.global_model = copy.deepcopy(segmenter)
        self.personalized = nn.ModuleDict({s: copy.deepcopy(segmenter) for s in self.site_names})
        self.selector = SelectorNet(len(self.site_names), spatial_dims, 3 * int(in_channels), selector_channels, selector_norm)
        self.last_routes: list[dict] = []

    def route(self, image_raw: torch.Tensor) -> dict:
        """The model for one image (batch of 1): {"model": "global" or a site, "site", "confidence", "probs"}."""
        with torch.autocast(device_type=image_raw.device.type, enabled=False):  # FedSeg runs the selector in float32
            q = torch.softmax(self.selector(selector_input(image_raw, self.selector_input_size)).double(), dim=1)[0]
        k = int(torch.argmax(q))
        confidence = float(q[k])
        model = self.site_names[k] if confidence > self.gamma else "global"
        return {
            "model": model,
            "site": self.site_names[k],
            "confidence": confidence,
            "probs": dict(zip(self.site_names, (float(p) for p in q))),
        }

    def forward(self, image: torch.Tensor, image_raw: torch.Tensor) -> torch.Tensor:
        out, self.last_routes = [], []
        for b in range(image.shape[0]):
            choice = self.route(image_raw[b : b + 1])
            net = self.global_model if choice["model"] == "global" else self.personalized[choice["model"]]
            out.append(self.probs(net, image[b : b + 1]))
            self.last_routes.append(choice)
            source = getattr(image, "meta", {}).get("filename_or_obj", [f"image {b}"])
            source = source[b] if isinstance(source, (list, tuple)) else source
            print(
                f"FedSM super model: {source} -> {choice['model']} model (selector: {choice['site']}, confidence "
                f"{choice['confidence']:.3f}, gamma {self.gamma})",
                flush=True,
            )  # the run's log: which model segmented what
        return torch.cat(out)
