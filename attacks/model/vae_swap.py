"""VAE replacement: the released pipeline's autoencoder exchanged for another one of the same latent space."""

from __future__ import annotations

from markbench import ModelAttack, PluginError, model_attacks, param


@model_attacks.register("vae_swap")
class VAESwap(ModelAttack):
    """Swap the pipeline's VAE for another autoencoder of the same latent space, as a user of Stable Diffusion swaps
    in the public fine-tuned decoder (``sd-vae-ft-mse``): the VAE-replacement adversary of model-persistence suites.
    A mark that lives in the decoder's weights (Stable Signature, Fernandez et al. ICCV 2023, whose paper names
    this threat) leaves with the decoder; a mark the UNet writes into the latents (SleeperMark, AquaLoRA, WDM) meets a
    decoder it was never tuned for.

    ``source = "base"``: the VAE of the public base model (the run's clean base; for a released model whose decoder
    was replaced by the owner, the original is public). Otherwise a built-in model of a world (``bench ls worlds``;
    e.g. ``"tiny-sd-rt"``, tiny-sd with a decoder trained for round trips, the tiny world's ft-MSE) or a diffusers
    model folder with a ``vae/`` subfolder, or a standalone autoencoder a world ships (``tiny-vae-ind``: tiny-sd's
    architecture and latent shape but trained independently, so *not* its latent space: the swap then shows what a
    foreign decoder or encoder does, not a benign replacement). The cache key holds a fingerprint of the weights
    ``source`` names (a shipped model's checksums, a folder's file names, sizes and times), so changed weights are
    attacked anew. The latent space must match (channels and downsampling factor); the swap changes no
    other weight and costs no training.
    """

    version = "1"
    goal = ""
    attacker_has = ("the released watermarked pipeline and a public autoencoder of the same latent space (the base "
                    "model's, or a public fine-tuned one); no key, no training")
    source: str = param("base", "the VAE swapped in: 'base' (the public base model's), a built-in model name (e.g. "
                        "'tiny-sd-rt'), a shipped autoencoder (e.g. 'tiny-vae-ind'), a diffusers VAE folder or a "
                        "model folder with a vae/ subfolder", names_model="vae")
    components: list[str] = param(["decoder"], "what is swapped: the decoder side (decoder, post_quant_conv: what "
                                  "generation uses) and/or the encoder side (encoder, quant_conv: what a latent "
                                  "verifier reads images through)", choices=("decoder", "encoder"))

    _SIDES = {"decoder": ("decoder", "post_quant_conv"), "encoder": ("encoder", "quant_conv")}

    def apply(self, pipe, ctx):
        other = self._other_vae(ctx)
        mine = pipe.vae
        if other.config.latent_channels != mine.config.latent_channels:
            raise PluginError(f"vae_swap: source {self.source!r} has latent_channels {other.config.latent_channels}, "
                              f"the pipeline's VAE {mine.config.latent_channels}: not the same latent space")
        if len(other.config.block_out_channels) != len(mine.config.block_out_channels):
            raise PluginError(f"vae_swap: source {self.source!r} downsamples by another factor than the pipeline's "
                              f"VAE: not the same latent space")
        state = mine.state_dict()
        theirs = other.state_dict()
        swapped = 0
        sides = {m for c in self.components for m in self._SIDES[c]}
        for key in state:
            if key.split(".")[0] in sides:
                if key not in theirs or theirs[key].shape != state[key].shape:
                    raise PluginError(f"vae_swap: source {self.source!r} has another architecture ({key})")
                state[key] = theirs[key].to(state[key])
                swapped += state[key].numel()
        mine.load_state_dict(state)
        ctx.record_cost(steps=0, swapped_params=swapped)
        return pipe

    def __init__(self, **given):
        super().__init__(**given)
        if self.source != "base":
            from markbench.models import vae_source

            vae_source(self.source, "vae_swap.source")  # a name or folder that is none: refused when the config is read

    def _other_vae(self, ctx):
        if self.source == "base":
            return ctx.data.verifier_pipeline().vae
        from markbench.models import load_vae

        # shared and read-only: apply() copies its tensors into the pipeline's own VAE
        return load_vae(self.source, where="vae_swap.source")
