"""The VAE: a diffusers AutoencoderKL from a local folder (a tiny random one saved by the test), latents
decoded after dividing by 0.18215, and effkernels-sample --vae writing the decoded PNGs and arr_0."""
import os

import numpy as np
import pytest
import torch
from effkernels.models.cli import sample as sample_mod
from effkernels.models.cli import train as train_mod
from effkernels.models.data.vae import VAEError, decode_latents, load_vae, to_uint8_nhwc

diffusers = pytest.importorskip("diffusers")

SMALL = '{"depth": 2, "hidden_size": 32, "num_heads": 2}'


def tiny_vae(path, seed):
    """An SD-VAE-shaped AutoencoderKL (4 latent channels, 2x down) with random weights, saved as the Hub's."""
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(path)
    return vae.eval()


def test_local_folder_loads_and_decodes_scaled_latents(tmp_path, seed):
    ref = tiny_vae(str(tmp_path / "vae"), seed)
    vae = load_vae(str(tmp_path / "vae"))
    z = torch.randn(3, 4, 8, 8) * 0.5
    img = decode_latents(vae, z, batch_size=2)
    with torch.no_grad():
        want = ref.decode(z / 0.18215).sample.clamp(-1, 1)
    assert img.shape == (3, 3, 16, 16)
    torch.testing.assert_close(img, want, rtol=1e-5, atol=1e-5)
    # the scale matters: decoding without the division gives other images
    assert (decode_latents(vae, z, scale=1.0) - img).abs().max() > 1e-3
    u8 = to_uint8_nhwc(img)
    assert u8.dtype == np.uint8 and u8.shape == (3, 16, 16, 3)
    assert np.array_equal(u8, np.clip(img.permute(0, 2, 3, 1).numpy() * 127.5 + 128, 0, 255).astype(np.uint8))
    with pytest.raises(VAEError, match="config.json"):
        load_vae(str(tmp_path))
    with pytest.raises(ValueError, match=r"latents must be \(N, 4, h, w\)"):
        decode_latents(vae, torch.randn(1, 8, 8, 8))


def test_sample_cli_writes_decoded_pngs(tmp_path, seed):
    from PIL import Image
    from test_latents import write_fast_dit

    write_fast_dit(str(tmp_path / "d"), 16, seed=seed)
    assert train_mod.main(["--out", str(tmp_path / "run"), "--data", str(tmp_path / "d"), "--model-kwargs", SMALL,
                           "--batch-size", "8", "--steps", "1", "--eval-every", "0", "--quiet",
                           "--data-workers", "0"]) == 0
    tiny_vae(str(tmp_path / "vae"), seed)
    out = str(tmp_path / "s")
    assert sample_mod.main(["--ckpt", str(tmp_path / "run" / "last.pt"), "--out", out, "--num", "3", "--steps", "2",
                            "--vae", str(tmp_path / "vae")]) == 0
    lat = torch.from_numpy(np.load(out + ".npz")["images"])
    assert lat.shape == (3, 4, 8, 8)
    arr = np.load(out + "_images.npz")["arr_0"]
    want = to_uint8_nhwc(decode_latents(load_vae(str(tmp_path / "vae")), lat))
    assert np.array_equal(arr, want)
    pngs = sorted(os.listdir(out + "_png"))
    assert pngs == ["000000.png", "000001.png", "000002.png"]
    assert np.array_equal(np.asarray(Image.open(os.path.join(out + "_png", pngs[1]))), want[1])
    assert os.path.isfile(out + "_decoded.png")
