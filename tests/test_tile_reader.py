"""One tile reader: training's two views, the validation references and `load_tile` see the same pixels."""

import numpy as np
import torch
from PIL import Image

from pixcell_ext.data import UNI_IMAGE_SIZE, UNI_RESAMPLE, load_tile, model_inputs, read_rgb, scan_image_folder


def test_every_reader_gives_the_same_centre_square_resized_once(tmp_path):
    rng = np.random.default_rng(0)
    for name, shape in (("ADI", (70, 90, 3)), ("TUM", (96, 64, 3))):  # landscape and portrait: the crop matters
        (tmp_path / name).mkdir()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(tmp_path / name / f"{name}-1.png")
    index = scan_image_folder(tmp_path)
    for i, record in enumerate(index.records):
        views = model_inputs(read_rgb(record.path), 48)
        assert torch.equal(load_tile(record.path, 48), views["vae_pixels"])
        assert torch.equal(index.tile(i, 48), views["vae_pixels"])
        assert torch.equal(load_tile(record.path, UNI_IMAGE_SIZE, UNI_RESAMPLE), views["uni_pixels"])
    side = min(70, 90)
    square = np.asarray(Image.open(index.records[0].path))[:, (90 - side) // 2 : (90 - side) // 2 + side]
    assert torch.equal(load_tile(index.records[0].path, side), torch.from_numpy(square.copy()).permute(2, 0, 1))


def test_the_uni_view_is_the_authors_resize_224(tmp_path):
    """UNI2-h features were extracted with torchvision's `Resize(224)` on PIL images (antialiased bilinear); a
    bicubic view of this noise tile is tens of grey levels away, so the test fails if the filter changes."""
    from torchvision import transforms

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 300, 3), dtype=np.uint8))
    expected = torch.from_numpy(np.asarray(transforms.Resize(UNI_IMAGE_SIZE)(image)).copy()).permute(2, 0, 1)
    difference = (model_inputs(image, 64)["uni_pixels"].int() - expected.int()).abs().max().item()
    assert difference <= 1, difference
