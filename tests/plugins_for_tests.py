"""Plugins that misbehave on purpose, registered under names starting with ``_test``."""

from __future__ import annotations

import os

import torch

from markbench import ImageAttack, ModelAttack, Param, image_attacks, model_attacks


class _Base(ImageAttack):
    version = "1"
    params = (Param("strength", "float", None, "unused", low=0.0, high=1.0, optional=True),)

    @classmethod
    def from_strength(cls, s):
        return {}


if "_test_crash" not in image_attacks:
    @image_attacks.register("_test_crash")
    class Crash(_Base):
        """Raises unless the file named by $MARKBENCH_TEST_FIXED exists."""

        def apply(self, images, generator):
            if os.path.exists(os.environ.get("MARKBENCH_TEST_FIXED", "/nonexistent")):
                return images.flip(-1)
            raise RuntimeError("boom: this attack always fails")

    @image_attacks.register("_test_nan")
    class NaNs(_Base):
        """Returns NaN images."""

        def apply(self, images, generator):
            return images * float("nan")

    @image_attacks.register("_test_shape")
    class WrongShape(_Base):
        """Returns images of the wrong size."""

        def apply(self, images, generator):
            return images[:, :, :16, :16]

    @image_attacks.register("_test_interrupt")
    class Interrupt(_Base):
        """Simulates Ctrl-C while the file named by $MARKBENCH_TEST_INTERRUPT exists."""

        def apply(self, images, generator):
            if os.path.exists(os.environ.get("MARKBENCH_TEST_INTERRUPT", "/nonexistent")):
                raise KeyboardInterrupt
            return images.flip(-2)

    @image_attacks.register("_test_die")
    class DieOnce(_Base):
        """Kills its own process (a worker lost mid-stage) unless the file ``marker`` exists; creates it first,
        so a retry succeeds. Otherwise flips the images."""

        params = _Base.params + (Param("marker", "str", "", "file that says the process was killed once "
                                                   "(empty: never kill)"),)

        def apply(self, images, generator):
            if self.marker and not os.path.exists(self.marker):
                import signal

                open(self.marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return images.flip(-1)

    @model_attacks.register("_test_scale")
    class ScaleConvIn(ModelAttack):
        """Scales the UNet's first convolution (a stand-in model attack)."""

        version = "1"
        params = (Param("factor", "float", 0.5, low=0.0, high=10.0),)

        def apply(self, pipe, ctx):
            with torch.no_grad():
                pipe.unet.conv_in.weight.mul_(self.factor)
            ctx.record_cost(steps=0, trainable_params=int(pipe.unet.conv_in.weight.numel()))
            return pipe


from markbench import Defense, Detection, Embedding, MarkLocation, Secret  # noqa: E402
from markbench.registries import defenses  # noqa: E402

if "_test_sleeper" not in defenses:
    @defenses.register("_test_sleeper")
    class Sleeper(Defense):
        """A toy in-sampler defence with two generation variants: the mark only appears with the 'trigger'."""

        version = "1"
        location = MarkLocation.INITIAL_NOISE
        variants = ("", "no_trigger")

        def embed(self, pipe, ctx):
            return Embedding(Secret({"message": torch.ones(8, dtype=torch.bool)}))

        def generate(self, pipe, secret, request, ctx):
            images = ctx.generate(pipe, request)
            if ctx.variant == "":
                images[:, :, :8, :8] = 1.0  # the "mark": a white corner
            return images

        def detect(self, secret, images, ctx):
            corner = images[:, :, :8, :8].mean((1, 2, 3)) > 0.99
            return Detection(bits=corner[:, None].repeat(1, 8))


if "_test_weightmark" not in defenses:
    @defenses.register("_test_weightmark")
    class WeightMark(Defense):
        """A toy weight mark: a key-dependent offset on the UNet's first convolution's bias, drawn from the embed
        stage's generator (so two embeddings have two keys); detection reads nothing (all zero bits)."""

        version = "1"
        location = MarkLocation.MODEL_WEIGHTS

        def embed(self, pipe, ctx):
            bias = pipe.unet.conv_in.bias
            with torch.no_grad():
                bias += 0.01 * torch.randn(bias.shape, generator=ctx.generator).to(bias)
            return Embedding(Secret({"message": torch.ones(8, dtype=torch.bool)}), pipeline=pipe)

        def detect(self, secret, images, ctx):
            return Detection(bits=torch.zeros(images.shape[0], 8, dtype=torch.bool))
