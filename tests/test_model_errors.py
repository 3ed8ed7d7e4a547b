"""Bad configs, bad inputs and bad checkpoint files give errors that name the problem."""

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from vqpipe import VQModel
from vqpipe.model import CheckpointError

SMALL = dict(block_out_channels=(32,), num_vq_embeddings=16)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    VQModel(**SMALL).save_pretrained(str(tmp_path / "ckpt"))
    return tmp_path / "ckpt"


@pytest.mark.parametrize("config, words", [
    (dict(norm_type="spatial", latent_channels=4, vq_embed_dim=8), "vq_embed_dim == latent_channels"),
    (dict(norm_type="layer"), "norm_type"),
    (dict(block_out_channels=(32, 64)), "same, non-zero length"),
    (dict(down_block_types=("CrossAttnDownBlock2D",)), "CrossAttnDownBlock2D"),
    (dict(block_out_channels=(48,)), "not divisible by norm_num_groups"),
    (dict(act_fn="tanhshrink"), "act_fn"),
])
def test_refuses_configs_that_cannot_run(config, words):
    with pytest.raises(ValueError, match=words):
        VQModel(**config)


@pytest.mark.parametrize("shape, words", [((1, 1, 16, 16), "3 input channels"), ((3, 16, 16), "3-D tensor")])
def test_rejects_bad_image_tensors(shape, words):
    model = VQModel(**SMALL)
    with pytest.raises(ValueError, match=words):
        model.encode(torch.zeros(shape))
    with pytest.raises(ValueError, match=words):
        model.tokenize(torch.zeros(shape))


def test_missing_config_names_the_file(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: config file not found"):
        VQModel.from_pretrained(str(checkpoint))


def test_malformed_config_names_the_file(checkpoint):
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        VQModel.from_pretrained(str(checkpoint))


def test_missing_weights_names_the_file(checkpoint):
    (checkpoint / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors: weights file not found"):
        VQModel.from_pretrained(str(checkpoint))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_names_the_file(checkpoint, damage):
    weights = checkpoint / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        VQModel.from_pretrained(str(checkpoint))


def test_missing_and_unexpected_keys_are_listed(checkpoint):
    weights = checkpoint / "diffusion_pytorch_model.safetensors"
    state = VQModel(**SMALL).state_dict()
    del state["quant_conv.weight"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"missing keys \[quant_conv\.weight\].*unexpected keys \[extra\.weight\]"):
        VQModel.from_pretrained(str(checkpoint))


def test_shape_mismatch_is_named(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["num_vq_embeddings"] = 32
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"quantize\.embedding\.weight \(16, 3\) != \(32, 3\)"):
        VQModel.from_pretrained(str(checkpoint))


def test_pickle_checkpoint_refused_without_allow_pickle(checkpoint):
    weights = checkpoint / "diffusion_pytorch_model.safetensors"
    state = VQModel(**SMALL).state_dict()
    torch.save(state, checkpoint / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(CheckpointError, match="refusing to load pickle"):
        VQModel.from_pretrained(str(checkpoint))
    model = VQModel.from_pretrained(str(checkpoint), allow_pickle=True)
    torch.testing.assert_close(model.quant_conv.weight, state["quant_conv.weight"])


def test_force_upcast_turns_fp16_into_bf16_with_warning():
    model = VQModel(**SMALL, force_upcast=True)
    with pytest.warns(UserWarning, match="force_upcast"):
        assert model.autocast_dtype("fp16", "cpu") == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert VQModel(**SMALL).autocast_dtype("fp16", "cpu") == torch.float16
        assert model.autocast_dtype("auto", "cpu") is None
        assert model.autocast_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="precision='fp8'"):
        model.autocast_dtype("fp8", "cpu")


def test_storage_error_while_looking_for_weights_is_not_weights_not_found(checkpoint):
    """A listing that fails for good is an I/O error, named as such; fsspec's own ``exists`` would
    answer False and the user would hunt for a file that is there."""
    import faultyfs

    with pytest.raises(OSError) as info:
        VQModel.from_pretrained(f"faulty://{checkpoint}", storage_options={
            "target_protocol": "file", "rate": 0.0, "ops": ["list"], "always": ["diffusion_pytorch_model"]})
    assert not isinstance(info.value, CheckpointError) and "not found" not in str(info.value)
    assert faultyfs.FaultyFileSystem.injected["list"] > 0
    # transient listing faults are retried: the checkpoint loads
    VQModel.from_pretrained(f"faulty://{checkpoint}", storage_options={
        "target_protocol": "file", "rate": 0.5, "seed": 1, "ops": ["list"]})
