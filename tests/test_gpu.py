"""The real world's device path: every plugin on a CUDA device (marked ``gpu``; skipped where there is none).

CI has no GPU, so these run only on a machine that has one:

    python -m pytest -m gpu tests/test_gpu.py

What they check: each defence embeds, generates and detects with the pipeline on the GPU (the harness keeps images
and secrets on the CPU); its secret's message is the CPU run's (every random draw comes from the stage's CPU
generator, whatever the device); each model attack returns a working pipeline on the GPU; HiDDeN trains on the GPU
(the Stable Signature extractor's training, the step a GPU makes affordable); and ``bench run`` runs a grid end to
end with ``run.device = "cuda"``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from markbench import model_attacks
from markbench.registries import defenses
from markbench.config import ModelConfig
from markbench.errors import MissingDependencyError
from markbench.generation import generate_images
from markbench.models import load_pipeline
from markbench.plugins import DetectionKind, GenerationRequest, MarkLocation, StageContext
from markbench.testing import Resources, check_detection, check_images, copy_pipeline
from markbench.store import ResultStore
from tests.conftest import MICRO_TOML, write_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"
PROMPTS = ["a red circle on a blue background"]


def _public(names):
    return [n for n in names if not n.startswith("_test")]


@pytest.fixture(scope="module")
def pipes():
    return {d: load_pipeline(ModelConfig(builtin="micro-sd"), device=d) for d in ("cpu", DEVICE)}


@pytest.fixture(scope="module")
def request_():
    return GenerationRequest(prompts=tuple(PROMPTS) * 2, seeds=(1, 2), height=64, width=64, num_inference_steps=2,
                             guidance_scale=7.5, batch_size=2)


def _ctx(seed, device, pipe=None):
    data = Resources(lambda: pipe, 64, 64, lambda: PROMPTS) if pipe is not None else None
    return StageContext(torch.Generator().manual_seed(seed), device, data=data)


def _mostly_close(a: torch.Tensor, b: torch.Tensor, share: float = 0.95) -> bool:
    """Same on both devices up to float noise: at least ``share`` of the elements within 1e-2 + 5e-2 |a| (TF32
    convolutions, and an Adam step whose tiny gradient changes sign, move a few elements by a learning rate)."""
    if a.dtype in (torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        return torch.equal(a.cpu(), b.cpu())
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    if a.shape != b.shape:
        return False
    close = (a - b).abs() <= 1e-2 + 5e-2 * a.abs()
    return bool(close.float().mean() >= share) if close.numel() else True


@pytest.mark.parametrize("name", _public(defenses.names()))
def test_defence_embeds_generates_and_detects_on_the_gpu(name, pipes, request_):
    cls = defenses.get(name)
    pipe = pipes[DEVICE]
    d = cls(**cls.smoke_params)
    try:
        emb = d.embed(copy_pipeline(pipe), _ctx(0, DEVICE, pipe))
        model = emb.pipeline or pipe
        if cls.location is MarkLocation.POST_HOC:
            images = d.mark(generate_images(pipe, request_, device=DEVICE), emb.secret, _ctx(1, DEVICE))
        else:
            images = d.generate(model, emb.secret, request_, _ctx(1, DEVICE))
        images = check_images(images.cpu(), name, (2, 3, 64, 64))
        n_bits = d.message(emb.secret).numel() if cls.detection is DetectionKind.BITS else None
        check_detection(d.detect(emb.secret, images, _ctx(2, DEVICE)), name, 2, cls.detection, n_bits)
    except MissingDependencyError as exc:  # an optional package the GPU machine lacks (benchmarks/gpu/prepare.sh)
        pytest.skip(str(exc))
    assert all(t.device.type == "cpu" for t in emb.secret.tensors.values())  # secrets are stored from the CPU
    # the same stage seed gives the same secret on any device: every draw comes from the stage's CPU generator
    on_cpu = d.embed(copy_pipeline(pipes["cpu"]), _ctx(0, "cpu", pipes["cpu"]))
    assert set(on_cpu.secret.tensors) == set(emb.secret.tensors)
    differ = [k for k, v in emb.secret.tensors.items() if not _mostly_close(on_cpu.secret.tensors[k], v)]
    assert not differ, differ


@pytest.mark.parametrize("name", _public(model_attacks.names()))
def test_model_attack_returns_a_working_pipeline_on_the_gpu(name, pipes, request_):
    cls = model_attacks.get(name)
    pipe = pipes[DEVICE]
    attacked = cls(**cls.smoke_params).apply(copy_pipeline(pipe), _ctx(0, DEVICE, pipe))
    images = generate_images(attacked, request_, device=DEVICE)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    # the same weights as the attack on the CPU, up to float noise (same draws from the same CPU generator)
    on_cpu = cls(**cls.smoke_params).apply(copy_pipeline(pipes["cpu"]), _ctx(0, "cpu", pipes["cpu"]))
    for part in ("unet", "vae", "text_encoder"):
        gpu_state, cpu_state = getattr(attacked, part).state_dict(), getattr(on_cpu, part).state_dict()
        differ = [k for k, v in gpu_state.items() if not _mostly_close(cpu_state[k], v)]
        assert not differ, (part, differ[:5])


def test_hidden_trains_on_the_gpu():
    """The small HiDDeN of ``tests/test_hidden.py`` (4 bits, textured 16 px covers), trained on the GPU: it learns
    as on the CPU (0.926 there) and hands its networks back on the CPU."""
    from markbench.defenses import hidden as H

    g = torch.Generator().manual_seed(9)
    train, held = torch.rand((256, 3, 16, 16), generator=g), torch.rand((64, 3, 16, 16), generator=g)
    cfg = H.HiddenConfig(bits=4, encoder_blocks=2, encoder_channels=16, decoder_blocks=3, decoder_channels=16,
                         encoder_output="residual", discriminator=False, image_loss_weight=0.0, message_loss="bce",
                         batch_size=32, schedule="cosine", strength=0.1, steps=2500)
    trained = H.train_hidden(H.quantize8(train), cfg, torch.Generator().manual_seed(0), device=DEVICE)
    assert next(trained.decoder.parameters()).device.type == "cpu"
    m = torch.randint(0, 2, (64, 4), generator=torch.Generator().manual_seed(1)).float()
    acc = H.bit_accuracy(trained.decoder, H.quantize8(held), m, cfg.threshold, trained.encoder, cfg, H.quantize8)
    assert acc > 0.85, acc


GRID = """
[[defenses]]
name = "stable_signature"
bits = 8
extractor_image_size = 0
extractor_train_images = 8
extractor_steps = 2
extractor_batch_size = 2
extractor_optimizer = "adam"
extractor_warmup = 0
whiten_images = 8
image_size = 0
steps = 2
batch_size = 2
warmup = 0

[[model_attacks]]
name = "lora"
steps = 2
num_images = 4
batch_size = 2
rank = 2
"""


def test_bench_run_on_the_gpu(tmp_path):
    """The micro grid (without the dwtdct defence, whose package the GPU machine may lack) plus Stable Signature and
    a LoRA attack, through the command line with ``run.device = "cuda"``: every cell must finish."""
    text = MICRO_TOML.replace('[[defenses]]\nname = "dwtdctsvd"\n', "") + GRID
    cfg = write_config(tmp_path, text)
    proc = subprocess.run([sys.executable, "-m", "markbench.cli", "run", "--config", str(cfg), "--no-progress",
                           "--set", "run.device=cuda"], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = ResultStore(tmp_path / "out" / "results.sqlite")
    cells = store.cells_frame()
    store.close()
    assert len(cells) > 0 and (cells["status"] == "ok").all(), cells[cells["status"] != "ok"].to_dict("records")
