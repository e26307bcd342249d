"""The tiny-world CLIP: an open_clip model from a custom config, its zero-shot classifier, and its text tower as a
``transformers.CLIPTextModel`` (the tiny Stable Diffusion's text encoder, as SD's is OpenAI CLIP's text tower).

The config ``open_clip_configs/TinyWorld-RN.json`` is registered with ``open_clip.add_model_config``: a small
ModifiedResNet image tower (convolutions learn shapes far faster than a ViT of the same size here), a 3-layer text
transformer of width 64 and the real CLIP BPE tokenizer (open_clip's default, 49,408 tokens, context 77). Images go
in as float tensors in [-1, 1] (mean = std = 0.5 in open_clip's terms), 64x64.

The shipped folder ``artifacts/tiny-clip/`` is an open_clip ``local-dir`` folder (``open_clip_config.json`` +
``open_clip_model.safetensors``), so ``open_clip.create_model_and_transforms("local-dir:<folder>")`` loads it too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from . import shapes

MODEL_NAME = "TinyWorld-RN"
CONFIG_DIR = Path(__file__).parent / "open_clip_configs"
WEIGHTS = "open_clip_model.safetensors"
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def register() -> None:
    """Make ``TinyWorld-RN`` known to open_clip (idempotent)."""
    import open_clip

    if MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def model_config() -> dict:
    return json.loads((CONFIG_DIR / f"{MODEL_NAME}.json").read_text())


def create(pretrained: str | None = None):
    """The open_clip model, randomly initialised or with weights from a local file."""
    import open_clip

    register()
    return open_clip.create_model(MODEL_NAME, pretrained=pretrained)


def tokenizer():
    """open_clip's CLIP BPE tokenizer (works offline; pads with 0 to 77 tokens)."""
    import open_clip

    register()
    return open_clip.get_tokenizer(MODEL_NAME)


def load(folder: str | Path | None = None):
    """The shipped (or a built) tiny CLIP, in eval mode."""
    from . import TINY_CLIP

    folder = Path(folder or TINY_CLIP)
    model = create(pretrained=str(folder / WEIGHTS))
    return model.eval().requires_grad_(False)


def save(model, folder: Path, half: bool = False) -> None:
    """Write ``folder`` as an open_clip local-dir model (config + safetensors).

    ``half``: store the weights as float16 (the shipped copy: half the bytes; loading casts them back to float32,
    and the zero-shot figures in the manifest are measured on exactly those weights).
    """
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else torch.float32
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": model_config(),
        "preprocess_cfg": {"mean": list(MEAN), "std": list(STD), "interpolation": "bicubic",
                           "resize_mode": "shortest"},
        "model_name": MODEL_NAME,
    }, indent=2))


def preprocess(images):
    """uint8 NHWC arrays, PIL images, or float NCHW tensors in [-1, 1] -> the model's input (NCHW, 64x64)."""
    import torch
    import torch.nn.functional as F

    if isinstance(images, torch.Tensor):
        x = images.float()
    else:
        if not isinstance(images, np.ndarray):
            images = np.stack([np.asarray(im.convert("RGB")) for im in images])
        x = shapes.to_tensor(images)
    if x.shape[-1] != shapes.IMAGE_SIZE or x.shape[-2] != shapes.IMAGE_SIZE:
        x = F.interpolate(x, size=(shapes.IMAGE_SIZE, shapes.IMAGE_SIZE), mode="bilinear", antialias=True,
                          align_corners=False)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


class ZeroShot:
    """Zero-shot attribute classifier: scores an image against every base-world caption and marginalises.

    The probability of shape ``s`` is the summed softmax probability of all captions naming ``s`` (any colour,
    background, size), so every text the model is asked about is one of the grammar's full captions.
    """

    ATTRIBUTES = ("shape", "colour", "background", "size")

    def __init__(self, model, batch_size: int = 256) -> None:
        import torch

        self.model = model.eval()
        self.batch_size = batch_size
        self.captions = shapes.base_captions()
        parsed = [shapes.parse_caption(c) for c in self.captions]
        self.classes = {"shape": list(shapes.SHAPES), "colour": list(shapes.COLOURS),
                        "background": list(shapes.BACKGROUNDS), "size": list(shapes.SIZES)}
        self.index = {a: torch.tensor([self.classes[a].index(p[a]) for p in parsed]) for a in self.ATTRIBUTES}
        tok = tokenizer()
        with torch.no_grad():
            feats = [model.encode_text(tok(self.captions[i:i + 512]), normalize=True)
                     for i in range(0, len(self.captions), 512)]
        self.text = torch.cat(feats)
        self.scale = float(model.logit_scale.detach().exp())

    def probs(self, images) -> dict[str, "np.ndarray"]:
        """Marginal class probabilities per attribute: ``{attr: float[n, n_classes]}``."""
        import torch

        x = preprocess(images)
        out = {a: [] for a in self.ATTRIBUTES}
        with torch.no_grad():
            for i in range(0, len(x), self.batch_size):
                f = self.model.encode_image(x[i:i + self.batch_size], normalize=True)
                p = torch.softmax(self.scale * f @ self.text.T, dim=-1)
                for a in self.ATTRIBUTES:
                    m = torch.zeros(len(f), len(self.classes[a]))
                    m.index_add_(1, self.index[a], p)
                    out[a].append(m)
        return {a: torch.cat(v).numpy() for a, v in out.items()}

    def predict(self, images) -> dict[str, list[str]]:
        probs = self.probs(images)
        return {a: [self.classes[a][j] for j in probs[a].argmax(1)] for a in self.ATTRIBUTES}

    def accuracy(self, images, captions: Sequence[str]) -> dict[str, float]:
        """Fraction correct per attribute, plus ``shape_and_colour`` (both right), against the captions."""
        pred = self.predict(images)
        truth = [shapes.parse_caption(c) for c in captions]
        n = len(truth)
        out = {a: float(np.mean([pred[a][i] == truth[i][a] for i in range(n)])) for a in self.ATTRIBUTES}
        out["shape_and_colour"] = float(np.mean([pred["shape"][i] == truth[i]["shape"]
                                                 and pred["colour"][i] == truth[i]["colour"] for i in range(n)]))
        out["n"] = n
        return out


# ---------------------------------------------------------------------------------------------------------------
# The text tower as a transformers CLIPTextModel
# ---------------------------------------------------------------------------------------------------------------
def hf_text_config():
    from transformers import CLIPTextConfig

    t = model_config()["text_cfg"]
    return CLIPTextConfig(
        vocab_size=t["vocab_size"], hidden_size=t["width"], intermediate_size=int(t["width"] * 4),
        num_hidden_layers=t["layers"], num_attention_heads=t["heads"], max_position_embeddings=t["context_length"],
        hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=model_config()["embed_dim"],
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )


def to_hf_text_encoder(model):
    """A ``transformers.CLIPTextModel`` computing exactly the open_clip model's text tower (before projection).

    open_clip keeps q, k, v in one ``in_proj``; transformers splits them. Both use a causal mask, exact GELU and
    a final LayerNorm over every token, so ``last_hidden_state`` equals open_clip's ``ln_final`` output.
    """
    import torch
    from transformers import CLIPTextModel

    cfg = hf_text_config()
    hf = CLIPTextModel(cfg)
    w = cfg.hidden_size
    src = model.state_dict()
    dst: dict[str, torch.Tensor] = {
        "text_model.embeddings.token_embedding.weight": src["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": src["positional_embedding"],
        "text_model.final_layer_norm.weight": src["ln_final.weight"],
        "text_model.final_layer_norm.bias": src["ln_final.bias"],
    }
    for i in range(cfg.num_hidden_layers):
        s, d = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        qkv_w, qkv_b = src[s + "attn.in_proj_weight"], src[s + "attn.in_proj_bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            dst[d + f"self_attn.{name}.weight"] = qkv_w[j * w:(j + 1) * w]
            dst[d + f"self_attn.{name}.bias"] = qkv_b[j * w:(j + 1) * w]
        pairs = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                 "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
        for dn, sn in pairs.items():
            dst[d + dn + ".weight"] = src[s + sn + ".weight"]
            dst[d + dn + ".bias"] = src[s + sn + ".bias"]
    # transformers 4 names keys "text_model.<...>", 5 drops the prefix: follow whatever this version uses
    prefix = "text_model." if any(k.startswith("text_model.") for k in hf.state_dict()) else ""
    dst = {prefix + k[len("text_model."):]: v.clone().float() for k, v in dst.items()}
    missing, unexpected = hf.load_state_dict(dst, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise RuntimeError(f"text tower conversion: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def scorer(pretrained: str | None, device: str, batch_size: int, default: Path):
    """The tiny CLIP as a :class:`bench.measures.clip_score.ClipScorer` (``pretrained``: a built folder or weights
    file, default ``default``; ``"random"``: random weights under seed 0, for tests)."""
    import torch

    from markbench.errors import UserError
    from markbench.measures.clip_score import RANDOM, ClipScorer

    if pretrained == RANDOM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = create(None)
    else:
        path = Path(pretrained).expanduser() if pretrained else Path(default)
        weights = path if path.is_file() else path / WEIGHTS
        if not weights.is_file():
            hint = ("run `bench zoo build` to build it" if not pretrained
                    else "point clip_score's pretrained at a folder built by `bench zoo build`")
            raise UserError(f"the tiny-world CLIP for clip_score is missing: no {weights}; {hint}")
        model = create(pretrained=str(weights))

    def prep(images):
        return preprocess(images * 2 - 1)

    return ClipScorer(model, prep, tokenizer(), device, batch_size,
                      preprocess_id=f"tiny-world v1: [-1, 1], bilinear antialiased resize to {shapes.IMAGE_SIZE}, "
                                    f"mean {tuple(MEAN)} std {tuple(STD)}")
