"""Example-level differential privacy at a site: DP-SGD through Opacus, and the site's privacy accountant.

The engine setting ``"dp": {"noise_multiplier": sigma, "max_grad_norm": C, "delta": delta}`` makes every training
step of the engine (``SegEngine.train``, whatever method calls it) a DP-SGD step:

* **Sampling.** Each step takes every training case of the site independently with probability
  ``q = min(1, batch_size / N)`` (N: the site's training cases; Opacus's ``UniformWithReplacementSampler``, i.e.
  Poisson sampling). The batch size varies around ``batch_size``; a step that draws no case is a step of noise
  alone. This is the sampling the accountant assumes.
* **Example.** One training case (image and label). The engine's training transforms crop one random patch of a
  case per draw, so a case adds at most one gradient to a step.
* **Clipping and noise.** Opacus's ``GradSampleModule`` computes every example's gradient; ``DPOptimizer`` clips
  each to L2 norm C (over all trainable parameters together), sums them, adds Gaussian noise of standard deviation
  ``sigma * C`` to every coordinate and divides by the expected batch size ``q * N``. The wrapped optimizer (Adam
  or SGD, with the engine's weight decay) then takes its step. FedProx's proximal term depends on no data: its
  gradient is added after the noise.
* **Accounting.** One ``opacus.accountants.RDPAccountant`` per ``SiteDP``; the engine keeps one ``SiteDP`` for
  its whole life (at a FLARE site: the job), so every step of every network the engine trains on the site's
  data adds ``(sigma, q)`` to the same accountant and ``epsilon(delta)`` is the privacy loss so far.
* **Budget.** A site may cap its privacy loss for the job (``SiteDP.max_epsilon``, set by the site from its own
  configuration, never by the job): before every ``train`` call the engine computes the epsilon that call's steps
  would bring the site to and refuses the whole call (``PrivacyBudgetExceeded``, nothing trained) when it would pass
  the cap, so the accountant never goes beyond it.
* **Randomness.** The sampling and the noise draw from generators seeded from the operating system's randomness
  (``secrets``), never from the job's seed: whoever knows the job (the server) can replay neither which cases a
  step used nor the noise. The noise uses Opacus's ``secure_mode`` draw (against floating-point attacks on the
  Gaussian sampler); the generators themselves are torch's, not cryptographic ones.

A network whose layers mix the examples of a batch cannot be trained this way: BatchNorm is refused (Opacus's
``ModuleValidator``); MONAI's instance norm (the engine's default) and group norm are per example.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch
from torch import nn

DP_KEY = "dp"  # the engine setting
DP_FIELDS = ("noise_multiplier", "max_grad_norm", "delta")
DP_METRICS = ("dp_epsilon", "dp_delta")  # what every training task of a DP site reports


class DPNetworkError(ValueError):
    """The network cannot be trained with per-example gradients (e.g. BatchNorm)."""


class PrivacyBudgetExceeded(RuntimeError):
    """Training would take the site's privacy loss beyond the site's own budget (max_epsilon)."""


def check_max_epsilon(value, where: str) -> float | None:
    """A site's privacy budget: None (no cap) or a finite number > 0; a ValueError naming `where` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: max_epsilon must be a finite number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DPSettings:
    noise_multiplier: float
    max_grad_norm: float
    delta: float

    @classmethod
    def from_value(cls, value) -> DPSettings:
        """The checked settings of an engine's "dp" value; a clear ValueError naming the setting otherwise."""
        where = f"engine setting {DP_KEY!r}"
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a dict with {list(DP_FIELDS)}, got {value!r}")
        unknown = sorted(set(value) - set(DP_FIELDS))
        missing = [k for k in DP_FIELDS if k not in value]
        if unknown or missing:
            raise ValueError(f"{where}: unknown key(s) {unknown}, missing key(s) {missing}; it takes exactly {list(DP_FIELDS)}")
        numbers = {}
        for key in DP_FIELDS:
            v = value[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{where}: {key} must be a finite number, got {v!r}")
            numbers[key] = float(v)
        for key in ("noise_multiplier", "max_grad_norm"):
            if numbers[key] <= 0:
                raise ValueError(f"{where}: {key} must be > 0, got {value[key]!r}")
        if not 0 < numbers["delta"] < 1:
            raise ValueError(f"{where}: delta must be in (0, 1), got {value['delta']!r}")
        return cls(**numbers)


def dp_errors(net: nn.Module) -> list[str]:
    """Why Opacus cannot train `net` with per-example gradients (empty: it can). The network is validated in
    training mode, as it trains."""
    try:
        from opacus.validators import ModuleValidator
    except ImportError as e:
        raise ImportError(
            f"engine setting {DP_KEY!r} (DP-SGD) needs Opacus: pip install opacus==1.6.0 (or fedseg[dp]); {e}"
        ) from e

    was_training = net.training
    net.train()
    try:
        errors = ModuleValidator.validate(net, strict=False)
    finally:
        net.train(was_training)
    return list(dict.fromkeys(f"{type(e).__name__}: {e}" for e in errors))


def check_dp_network(net: nn.Module, norm=None) -> None:
    """Raise DPNetworkError, naming the setting, when the network cannot be trained with DP-SGD."""
    errors = dp_errors(net)
    if errors:
        raise DPNetworkError(
            f"engine setting {DP_KEY!r} (DP-SGD) refused: the engine's network (norm {norm!r}) cannot be trained with "
            f"per-example gradients: {'; '.join(errors)}. Set the engine's network norm to 'instance' (the default) "
            "or 'instance_affine', or leave 'dp' out"
        )


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from the operating system's randomness (not from the job's seed)."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


class SiteDP:
    """DP-SGD at one site: the Poisson sampler, the DP optimizer around the engine's optimizer, and the one
    accountant every DP step of the site's engine adds to."""

    def __init__(self, settings: DPSettings, num_examples: int, batch_size: int, max_epsilon: float | None = None):
        from opacus.accountants import RDPAccountant

        if num_examples < 1:
            raise ValueError("DP-SGD needs training cases: the site has none")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.settings = settings
        self.num_examples = int(num_examples)
        self.sample_rate = min(1.0, batch_size / self.num_examples)
        # what the sum of clipped gradients is divided by: q * N (batch_size, or N when batch_size >= N)
        self.expected_batch_size = min(int(batch_size), self.num_examples)
        self.accountant = RDPAccountant()
        self.steps = 0
        self.max_epsilon = check_max_epsilon(max_epsilon, "SiteDP")  # the site's budget (None: no cap)

    # ---- the mechanism -----------------------------------------------------------------------------------
    def sampler(self):
        """Batches of case indices, each case in each batch independently with probability sample_rate."""
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        return UniformWithReplacementSampler(
            num_samples=self.num_examples, sample_rate=self.sample_rate, generator=secret_generator()
        )

    def optimizer(self, optimizer: torch.optim.Optimizer, device: torch.device):
        """Opacus's DPOptimizer around `optimizer`: clip every example's gradient, sum, add noise, average."""
        from opacus.optimizers import DPOptimizer

        return DPOptimizer(
            optimizer,
            noise_multiplier=self.settings.noise_multiplier,
            max_grad_norm=self.settings.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
            loss_reduction="mean",
            generator=secret_generator(device),
            secure_mode=True,
        )

    def record_step(self) -> None:
        """One DP step taken (noise added, parameters updated): it goes into the accountant."""
        self.accountant.step(noise_multiplier=self.settings.noise_multiplier, sample_rate=self.sample_rate)
        self.steps += 1

    # ---- what the site can certify ------------------------------------------------------------------------
    def epsilon(self) -> float:
        """epsilon at the configured delta of everything trained so far (0 before the first step)."""
        return float(self.accountant.get_epsilon(self.settings.delta)) if self.steps else 0.0

    def epsilon_after(self, more_steps: int) -> float:
        """epsilon at the configured delta if `more_steps` further DP steps were taken (nothing is recorded)."""
        from opacus.accountants import RDPAccountant

        if more_steps < 0:
            raise ValueError(f"more_steps must be >= 0, got {more_steps}")
        projected = RDPAccountant()
        projected.history = list(self.accountant.history)
        if more_steps:
            projected.history.append((self.settings.noise_multiplier, self.sample_rate, int(more_steps)))
        return float(projected.get_epsilon(self.settings.delta)) if projected.history else 0.0

    def check_budget(self, more_steps: int, site: str) -> None:
        """Raise PrivacyBudgetExceeded, before anything is trained, when `more_steps` DP steps would take the site's
        epsilon beyond its max_epsilon."""
        if self.max_epsilon is None:
            return
        after = self.epsilon_after(more_steps)
        if after > self.max_epsilon:
            raise PrivacyBudgetExceeded(
                f"site {site} stops training: its privacy budget is spent. epsilon so far {self.epsilon():.4g} at delta "
                f"{self.settings.delta:g}; the {more_steps} DP-SGD steps asked would bring it to {after:.4g}, above "
                f'the site\'s max_epsilon {self.max_epsilon:g} (its local/fedseg_site.json "max_epsilon"); nothing '
                "was trained"
            )

    def metrics(self) -> dict[str, float]:
        return {"dp_epsilon": self.epsilon(), "dp_delta": self.settings.delta}

    def describe(self) -> str:
        s = self.settings
        return (
            f"epsilon {self.epsilon():.4g} so far at delta {s.delta:g} ({self.steps} DP-SGD steps of noise multiplier "
            f"{s.noise_multiplier:g}, max grad norm {s.max_grad_norm:g}, sample rate {self.sample_rate:.4g} of "
            f"{self.num_examples} training cases)"
        )
