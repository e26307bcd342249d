"""Adversarial attack on a surrogate detector the attacker trains itself (WAVES' AdvCls); with the target flipped,
a forgery."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from markbench import AttackContext, image_attacks, ImageAttack, param


def surrogate_net(width: int) -> torch.nn.Module:
    """The surrogate: a small CNN (three stride-2 3x3 conv + GELU blocks of width w, 2w, 4w, global average pool,
    one logit: "marked")."""
    w = width
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, w, 3, stride=2, padding=1), torch.nn.GELU(),
        torch.nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), torch.nn.GELU(),
        torch.nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), torch.nn.GELU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4 * w, 1))


@image_attacks.register("adv_surrogate")
class AdvSurrogate(ImageAttack):
    """Adversarial attack on a surrogate watermark detector the attacker trains from its own images.

    WAVES (An et al., ICML 2024, "WAVES: Benchmarking the Robustness of Image Watermarks"), AdvCls: the attacker
    generates ``train_images`` images from the watermarked model (as it can get them: for a trigger mark such as
    SleeperMark it does not know the trigger, so its "watermarked" images are trigger-free, and the surrogate can
    only learn what they carry) and as many from the clean base, trains a binary classifier on them (a cached
    ``surrogate`` stage: Adam, ``train_steps`` steps of ``train_batch`` images, BCE), then runs L-infinity PGD
    (Madry et al., ICLR 2018) against it: removal pushes the marked images' "marked" logit down; with the target
    flipped (``mode = "forge"``) it pushes clean images' logit up, a spoofing attack whose cell measures the
    defence's false-positive rate on the forged images.

    WAVES trains a ResNet-18 surrogate on 7.5k / 7.5k images; on a CPU in the tiny world the surrogate is the small
    CNN :func:`surrogate_net` (width ``width``) and the training-set size and steps are parameters (the config says
    which). PGD: a uniform random start in the eps-ball, ``steps`` signed-gradient steps of ``step_size * eps``,
    projection, output rounded to the 8-bit grid toward the input (the budget holds exactly on what is stored).

    Strength mapping (WAVES' budget range): ``eps = (2 + 6 s) / 255``; default 5/255. Cost recorded: the surrogate
    stage's ``attacker_images`` (2 ``train_images``) and ``model_evals`` (training forward/backward passes, in
    images); the attack's ``model_evals`` (PGD forward/backward passes, in images).
    """

    version = "1"
    strength_mapping = "eps = (2 + 6 s) / 255"
    zero_strength_tolerance = 2.0 / 255
    trains_surrogate = True
    surrogate_params = ("train_images", "train_steps", "train_batch", "lr", "width")
    can_forge = True
    forge_params = {"mode": "forge"}
    smoke_params = {"steps": 3, "train_steps": 5}
    eps: float = param(5.0 / 255, "L-infinity budget (image range [0, 1])", low=0.0, high=1.0)
    steps: int = param(50, "PGD iterations", low=1, high=10000)
    step_size: float = param(0.05, "each PGD step's size as a fraction of eps", low=0.0, high=1.0)
    mode: str = param("remove", "'remove': push marked images to 'clean'; 'forge': push clean images to 'marked' "
                      "(a forgery cell)", choices=("remove", "forge"))
    train_images: int = param(64, "images per class the attacker generates to train the surrogate", low=2,
                              high=100000)
    train_steps: int = param(300, "surrogate training steps", low=1, high=1000000)
    train_batch: int = param(32, "surrogate training batch (images of both classes)", low=2, high=4096)
    lr: float = param(1e-3, "surrogate Adam learning rate", low=0.0, high=1.0)
    width: int = param(16, "surrogate CNN width (channels of its first block)", low=1, high=512)
    batch_size: int = param(16, "images attacked at once", low=1, high=1024)

    @classmethod
    def from_strength(cls, s: float) -> dict[str, Any]:
        return {"eps": (2.0 + 6.0 * s) / 255.0}

    @property
    def forges(self) -> bool:
        return self.mode == "forge"

    # -- the surrogate ----------------------------------------------------------------------------------------
    def train_surrogate(self, marked: torch.Tensor, clean: torch.Tensor, generator: torch.Generator,
                        ctx: AttackContext) -> dict[str, torch.Tensor]:
        """Train the classifier (label 1: marked) with Adam on random mini-batches drawn from the generator;
        returns its state dict and its training accuracy (``train_accuracy``)."""
        x = torch.cat([marked, clean]).float()
        y = torch.cat([torch.ones(marked.shape[0]), torch.zeros(clean.shape[0])])
        init = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=generator)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=init)))
            net = surrogate_net(self.width)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        batch = min(self.train_batch, x.shape[0])
        with torch.enable_grad():
            for _ in range(self.train_steps):
                idx = torch.randperm(x.shape[0], generator=generator)[:batch]
                loss = F.binary_cross_entropy_with_logits(net(x[idx]).squeeze(1), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            acc = ((net(x).squeeze(1) > 0).float() == y).float().mean()
        ctx.record_cost(attacker_images=int(x.shape[0]), model_evals=int(self.train_steps * batch),
                        train_accuracy=float(acc))
        return {**{f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()},
                "train_accuracy": acc.reshape(1)}

    def load_surrogate(self, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten: leave the global RNG alone
            net = surrogate_net(self.width)
        net.load_state_dict({k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")})
        return net.eval().requires_grad_(False)

    # -- PGD --------------------------------------------------------------------------------------------------
    def apply(self, images: torch.Tensor, generator: torch.Generator, ctx: AttackContext) -> torch.Tensor:
        return self._attack(images, generator, ctx, target=0.0)

    def forge(self, clean: torch.Tensor, marked: torch.Tensor, generator: torch.Generator,
              ctx: AttackContext) -> torch.Tensor:
        """PGD on the clean images toward the surrogate's "marked" (the marked images taught the surrogate in its
        own stage; they are not used here)."""
        return self._attack(clean, generator, ctx, target=1.0)

    def _attack(self, images: torch.Tensor, generator: torch.Generator, ctx: AttackContext,
                target: float) -> torch.Tensor:
        if ctx is None or ctx.surrogate is None:
            from markbench import PluginError

            raise PluginError("adv_surrogate needs its trained surrogate (ctx.surrogate): run it through the harness")
        net = self.load_surrogate(ctx.surrogate)
        out = [self.perturb(net, images[i:i + self.batch_size], generator, target)
               for i in range(0, images.shape[0], self.batch_size)]
        ctx.record_cost(model_evals=int(self.steps * images.shape[0]), attacker_images=0)
        return torch.cat(out)

    def perturb(self, net: torch.nn.Module, x: torch.Tensor, generator: torch.Generator,
                target: float) -> torch.Tensor:
        """L-inf PGD lowering BCE(net(x + delta), target); quantised toward the input, ``|delta| <= eps``."""
        eps = self.eps
        x = x.float()
        delta = ((x + (torch.rand(x.shape, generator=generator) * 2 - 1) * eps).clamp(0, 1) - x)
        alpha = self.step_size * eps
        t = torch.full((x.shape[0],), target)
        with torch.enable_grad():
            for _ in range(self.steps):
                delta.requires_grad_(True)
                loss = F.binary_cross_entropy_with_logits(net(x + delta).squeeze(1), t, reduction="sum")
                (grad,) = torch.autograd.grad(loss, delta)
                with torch.no_grad():
                    delta = (delta - alpha * grad.sign()).clamp(-eps, eps)
                    delta = (x + delta).clamp(0, 1) - x
        delta = torch.trunc(delta.detach() * 255.0) / 255.0
        return (x + delta).clamp(0.0, 1.0)
