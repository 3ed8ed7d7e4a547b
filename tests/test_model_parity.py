"""vqpipe.VQModel against diffusers.VQModel, the reference implementation (test-only dependency)."""

import json

import fsspec
import pytest
import torch

from vqpipe import VQModel
from vqpipe.model.quantizer import nearest_codes

diffusers = pytest.importorskip("diffusers")

TWO_LEVELS = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
)
CONFIGS = {
    "defaults": {},
    "three_levels_attn_blocks": dict(
        block_out_channels=(32, 32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
    ),
    "layers_per_block_2": dict(TWO_LEVELS, layers_per_block=2, num_vq_embeddings=512),
    "vq_embed_dim_differs": dict(TWO_LEVELS, latent_channels=4, vq_embed_dim=8),
    "spatial_norm_movq": dict(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4, norm_type="spatial",
    ),
    "no_mid_attention": dict(TWO_LEVELS, mid_block_add_attention=False),
    "gelu_groups_16": dict(TWO_LEVELS, act_fn="gelu", norm_num_groups=16, layers_per_block=1),
}


def _pair(config):
    torch.manual_seed(0)
    reference = diffusers.VQModel(**config).eval()
    ours = VQModel(**config).eval()
    result = ours.load_state_dict(reference.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return reference, ours


def _assert_codes_agree_except_ties(z, codes_a, codes_b, codebook):
    """Codes may differ only where two codewords are equally near (to 1e-5 relative)."""
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
    a, b = codes_a.reshape(-1), codes_b.reshape(-1)
    differ = (a != b).nonzero().flatten()
    cb = codebook.double()
    da = ((flat[differ] - cb[a[differ]]) ** 2).sum(1)
    db = ((flat[differ] - cb[b[differ]]) ** 2).sum(1)
    torch.testing.assert_close(da, db, rtol=1e-5, atol=1e-12)
    return differ.numel()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers(name):
    reference, ours = _pair(CONFIGS[name])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 48, generator=gen)  # non-square on purpose
    with torch.no_grad():
        h_ref = reference.encode(x).latents
        h = ours.encode(x).latents
        torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.decode(h_ref).sample, reference.decode(h_ref).sample, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours(x).sample, reference(x).sample, atol=1e-4, rtol=1e-4)
        ours_commit = ours.decode(h_ref).commit_loss
        torch.testing.assert_close(ours_commit, reference.decode(h_ref).commit_loss, atol=1e-6, rtol=1e-5)

        _, _, (_, _, ref_idx) = reference.quantize(h_ref)
        codes, latents = ours.tokenize(x)
        _assert_codes_agree_except_ties(h_ref, codes, ref_idx.view(codes.shape), reference.quantize.embedding.weight)
        torch.testing.assert_close(latents, h_ref * reference.config.scaling_factor, atol=1e-5, rtol=1e-5)


def test_forward_returns_decoded_sample_like_diffusers():
    reference, ours = _pair({})
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = ours(x)
        sample, loss = ours(x, return_dict=False)
    assert out.sample.shape == x.shape and out[0].shape == x.shape
    torch.testing.assert_close(sample, out.sample)
    assert loss.ndim == 0


def test_lookup_from_codebook_decodes_indices_like_diffusers():
    config = dict(TWO_LEVELS, lookup_from_codebook=True, latent_channels=4)
    reference, ours = _pair(config)
    codes = torch.randint(0, 256, (2, 8, 8), generator=torch.Generator().manual_seed(3))
    shape = (2, 8, 8, 4)
    with torch.no_grad():
        ref = reference.decode(codes, force_not_quantize=True, shape=shape).sample
        got = ours.decode(codes, force_not_quantize=True, shape=shape).sample
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.decode_codes(codes), ref, atol=1e-4, rtol=1e-4)


def test_codes_round_trip_through_decode_codes():
    _, ours = _pair(CONFIGS["spatial_norm_movq"])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        codes, _ = ours.tokenize(x)
        quant, _, _ = ours.quantize(ours.encode(x).latents)
        expected = ours.decoder(ours.post_quant_conv(quant), quant)
        torch.testing.assert_close(ours.decode_codes(codes), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("protocol", ["local", "memory"])
def test_loads_folder_written_by_diffusers(tmp_path, protocol):
    config = CONFIGS["vq_embed_dim_differs"]
    reference, _ = _pair(config)
    reference.save_pretrained(tmp_path / "ckpt")
    if protocol == "local":
        url = str(tmp_path / "ckpt")
    else:
        url = "memory://vqpipe-test/ckpt"
        fs = fsspec.filesystem("memory")
        for name in ("config.json", "diffusion_pytorch_model.safetensors"):
            fs.pipe_file(f"/vqpipe-test/ckpt/{name}", (tmp_path / "ckpt" / name).read_bytes())
    ours = VQModel.from_pretrained(url).eval()
    assert ours.config.vq_embed_dim == 8 and len(ours.weights_sha256) == 64
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x).latents, reference.encode(x).latents, atol=1e-5, rtol=1e-5)


def test_diffusers_loads_folder_written_by_vqpipe(tmp_path):
    _, ours = _pair(CONFIGS["spatial_norm_movq"])
    ours.save_pretrained(str(tmp_path / "ckpt"))
    reference = diffusers.VQModel.from_pretrained(tmp_path / "ckpt").eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(reference(x).sample, ours(x).sample, atol=1e-4, rtol=1e-4)


def test_subfolder_and_legacy_attention_names(tmp_path):
    reference, _ = _pair({})
    folder = tmp_path / "repo" / "vqvae"
    reference.save_pretrained(folder)
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    legacy = {}
    for key, value in weights.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            key = key.replace(f".{new}.", f".{old}.")
        legacy[key] = value
    assert any(".query." in k for k in legacy)
    save_file(legacy, folder / "diffusion_pytorch_model.safetensors")
    ours = VQModel.from_pretrained(str(tmp_path / "repo"), subfolder="vqvae")
    torch.testing.assert_close(ours.encoder.mid_block.attentions[0].to_q.weight,
                               reference.encoder.mid_block.attentions[0].to_q.weight)


def test_unknown_config_keys_are_ignored_with_warning(tmp_path, caplog):
    _, ours = _pair({})
    ours.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    config["some_future_option"] = 7
    (tmp_path / "config.json").write_text(json.dumps(config))
    VQModel.from_pretrained(str(tmp_path))
    assert "some_future_option" in caplog.text


@pytest.mark.parametrize("codebook_size", [256, 8192, 65536])
def test_fast_codebook_search_matches_reference_argmin(codebook_size):
    gen = torch.Generator().manual_seed(codebook_size)
    codebook = torch.randn(codebook_size, 8, generator=gen)
    z = torch.randn(3000, 8, generator=gen)
    expected = torch.cdist(z.double(), codebook.double()).argmin(1)
    got = nearest_codes(z, codebook)
    # Exact ties in float64 are measure-zero for Gaussian data; agreement must be total.
    assert torch.equal(got, expected)


def test_codebook_search_stays_fp32_under_autocast():
    gen = torch.Generator().manual_seed(7)
    codebook = torch.randn(4096, 4, generator=gen)
    z = torch.randn(2000, 4, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nearest_codes(z, codebook)
    assert torch.equal(got, torch.cdist(z.double(), codebook.double()).argmin(1))
