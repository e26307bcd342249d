"""Gaussian Shading (defenses/gaussian_shading.py): layout from the latent shape, cipher, sampling and decoding."""

from __future__ import annotations

import pytest
import torch
from scipy import stats as st

pytest.importorskip("cryptography")  # the `crypto` extra

from markbench import Secret  # noqa: E402
from markbench.defenses.gaussian_shading import (GaussianShading, block_shape, keystream_bits, majority_vote,  # noqa: E402
                                       repeat_bits)


def _secret(d: GaussianShading, shape, seed=0) -> Secret:
    g = torch.Generator().manual_seed(seed)
    block = block_shape(shape, d.channel_copies, d.hw_copies)
    return Secret({"message": torch.randint(0, 2, block, generator=g).bool().reshape(-1),
                   "key": torch.randint(0, 256, (32,), generator=g).to(torch.uint8),
                   "nonce": torch.randint(0, 256, (16,), generator=g).to(torch.uint8)})


def _marked(d: GaussianShading, secret: Secret, shape, n, seed=1):
    noise = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
    return torch.where(d.encrypted_bits(secret, shape)[None], noise.abs(), -noise.abs())


def test_bit_count_follows_the_latent_shape():
    d = GaussianShading()  # the paper's factors: 1 channel copy, 8 x 8 spatial copies
    assert block_shape((4, 64, 64), d.channel_copies, d.hw_copies) == (4, 8, 8)  # SD: 256 bits
    assert block_shape((4, 16, 16), d.channel_copies, d.hw_copies) == (4, 2, 2)  # tiny-sd: 16 bits
    assert block_shape((4, 16, 16), 1, 4) == (4, 4, 4)  # the tiny-world config: 64 bits
    with pytest.raises(ValueError, match="divisible"):
        block_shape((4, 12, 12), 1, 8)


def test_repeat_then_majority_vote_returns_the_block():
    block = torch.randint(0, 2, (2, 3, 3), generator=torch.Generator().manual_seed(0)).bool()
    tiled = repeat_bits(block, 2, 4)
    assert tiled.shape == (4, 12, 12)
    assert torch.equal(majority_vote(tiled[None], (2, 3, 3), 2, 4)[0], block.reshape(-1))


def test_keystream_is_chacha20_and_depends_on_key_and_nonce():
    key, nonce = bytes(range(32)), bytes(16)
    a = keystream_bits(key, nonce, 4096)
    assert torch.equal(a, keystream_bits(key, nonce, 4096))
    assert 0.45 < a.float().mean() < 0.55
    assert (a != keystream_bits(key, bytes([1]) + bytes(15), 4096)).float().mean() > 0.4
    # RFC 7539 section 2.4.2 test vector's key and nonce: the first keystream byte is 0x22 (encrypting "L" = 0x4c
    # gives 0x6e); cryptography's 16-byte nonce is the 4-byte little-endian counter (1) then the 12-byte nonce
    rfc_key = bytes(range(32))
    rfc_nonce = (1).to_bytes(4, "little") + bytes.fromhex("000000000000004a00000000")
    first = keystream_bits(rfc_key, rfc_nonce, 8)
    assert sum(int(b) << i for i, b in enumerate(first.tolist())) == 0x6E ^ 0x4C


def test_marked_noise_is_still_standard_normal_with_balanced_signs():
    d = GaussianShading(hw_copies=4)
    shape = (4, 16, 16)
    secret = _secret(d, shape)
    secret.tensors["message"] = torch.zeros_like(secret.tensors["message"])  # even an all-zero message
    z = _marked(d, secret, shape, 64)
    # each element: a half-normal magnitude with a sign that is a keystream bit (uniform, independent of the message)
    assert st.kstest(z.abs().flatten().numpy(), "halfnorm").pvalue > 0.01
    signs = (z[0] > 0).float()
    assert st.binomtest(int(signs.sum()), signs.numel(), 0.5).pvalue > 0.01
    # and across deployments (keys), an element's sign is a fair coin even for a fixed message
    keyed = []
    for s in range(200):
        other = _secret(d, shape, seed=s)
        other.tensors["message"] = secret.tensors["message"]
        keyed.append(bool(d.encrypted_bits(other, shape)[0, 0, 0]))
    assert st.binomtest(sum(keyed), len(keyed), 0.5).pvalue > 0.01


def test_decoding_recovers_the_message_exactly_from_the_noise_and_through_30_percent_sign_flips():
    d = GaussianShading(hw_copies=4)
    shape = (4, 16, 16)
    secret = _secret(d, shape)
    message = d.message(secret)
    z = _marked(d, secret, shape, 16)
    assert (d.decode(secret, z) == message).all()
    flips = torch.rand(z.shape, generator=torch.Generator().manual_seed(7)) < 0.3
    acc = (d.decode(secret, torch.where(flips, -z, z)) == message).float().mean()
    assert acc > 0.85  # 16 copies, each right with p = 0.7: a bit is wrong with probability about 0.05
    other = _secret(d, shape, seed=9)
    wrong_key = (d.decode(other, z) == message).float().mean()
    assert 0.35 < wrong_key < 0.65  # without the key the signs say nothing about the message
