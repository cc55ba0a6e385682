"""The encoders' preprocess, split between the loader's workers (uint8 pixels) and the device (float,
normalised): the very embeddings of the whole transform on the host; and loader workers that serve pass
after pass."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos
from torchvision import transforms

from pipeline.core.errors import ViclipError
from pipeline.encoders.base import split_preprocess
from pipeline.encoders.clip import load_clip
from pipeline.encoders.cnn import IMAGENET_MEAN, IMAGENET_STD, load_cnn
from pipeline.encoders.images import FileLoader, encode_files, open_rgb

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list:
    """Real photographs in the colour modes users send, and synthetic images: noise at odd shapes, one smaller
    than any model's input, the extremes of the pixel range."""
    folder = tmp_path_factory.mktemp("images")
    chelsea = Image.fromarray(photos.chelsea())
    rng = np.random.default_rng(0)
    images = {
        "astronaut.jpg": Image.fromarray(photos.astronaut()),
        "coffee.jpg": Image.fromarray(photos.coffee()),
        "camera.png": Image.fromarray(photos.camera()),  # greyscale
        "chelsea_rgba.png": chelsea.convert("RGBA"),
        "chelsea_cmyk.jpg": chelsea.convert("CMYK"),
        "noise_wide.png": Image.fromarray(rng.integers(0, 256, (37, 301, 3), dtype=np.uint8)),
        "noise_tall.png": Image.fromarray(rng.integers(0, 256, (500, 61, 3), dtype=np.uint8)),
        "tiny.png": Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)),
        "black.png": Image.new("RGB", (90, 70)),
        "white.png": Image.new("RGB", (70, 90), (255, 255, 255)),
    }
    for name, image in images.items():
        image.save(folder / name)
    return [folder / name for name in images]


def whole_transform(kind: str, config):
    """The transform each encoder ran in the loader's workers before the split: ToTensor and Normalize included."""
    if kind == "clip":
        import open_clip

        return open_clip.create_model_and_transforms(config.clip.model, pretrained=None)[2]
    size = config.cnn.image_size
    return transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@pytest.mark.parametrize("kind", ["clip", "cnn"])
def test_uint8_pixels_normalised_by_the_encoder_give_the_whole_transforms_embeddings(tiny_config, image_files, kind):
    encoder = load_clip(tiny_config.clip, CPU) if kind == "clip" else load_cnn(tiny_config.cnn, CPU)
    images, transform = [open_rgb(path) for path in image_files], whole_transform(kind, tiny_config)
    floats = torch.stack([transform(image) for image in images])
    pixels = torch.stack([encoder.preprocess(image) for image in images])
    assert pixels.dtype == torch.uint8 and pixels.shape == floats.shape
    assert torch.equal(encoder.standardise(pixels), floats)
    # The encoder as it was, given float pixels, against the encoder as it is, given uint8 ones.
    before = dataclasses.replace(encoder, standardise=torch.nn.Identity())(floats)
    assert torch.equal(encoder(pixels), before)
    # And through the loader's workers, as extraction and `viclip caption` decode them.
    _, features, bad = next(encode_files(encoder, image_files, len(image_files), 2, CPU))
    assert bad == [] and torch.equal(torch.from_numpy(features), before)


@pytest.mark.parametrize("steps, named", [
    ([transforms.Resize(8), transforms.ToTensor()], "(Resize, ToTensor)"),
    ([transforms.PILToTensor(), transforms.Normalize((0.5,), (0.5,))], "(PILToTensor, Normalize)"),
    ([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,)), transforms.RandomErasing()],
     "(ToTensor, Normalize, RandomErasing)"),
])
def test_a_transform_that_does_not_end_in_to_tensor_normalize_is_refused(steps, named):
    with pytest.raises(ViclipError, match="does not end in ToTensor, Normalize") as refused:
        split_preprocess(transforms.Compose(steps))
    assert named in str(refused.value) and "\n" not in str(refused.value)


@dataclasses.dataclass
class DecodedBy:
    """An encoder whose features are the process that decoded each image."""

    preprocess = staticmethod(lambda image: torch.tensor([os.getpid()]))

    def __call__(self, pids: torch.Tensor) -> torch.Tensor:
        return pids


def test_the_loader_workers_serve_every_pass_and_bad_files_yield_their_errors(tmp_path):
    paths = []
    for n in range(8):
        paths.append(tmp_path / f"{n}.png")
        Image.new("RGB", (4, 4), (n, n, n)).save(paths[-1])
    (tmp_path / "3.png").write_bytes(b"not an image")
    paths.append(tmp_path / "missing.png")
    loader = FileLoader(DecodedBy(), paths, 2, 2, CPU)

    def one_pass(rows):
        batches = list(loader.encode(rows))
        decoded = {int(row): int(pid) for rows, pids, _ in batches if pids is not None
                   for row, pid in zip(rows, pids[:, 0])}
        return decoded, sorted(error for _, _, bad in batches for error in bad)

    first, bad = one_pass(None)
    assert sorted(first) == [0, 1, 2, 4, 5, 6, 7] and bad == [(3, "not an image"), (8, "missing")]
    second, bad = one_pass([7, 8, 6, 5, 3])
    assert sorted(second) == [5, 6, 7] and bad == [(3, "not an image"), (8, "missing")]
    workers = set(first.values())
    assert len(workers) == 2 and os.getpid() not in workers and set(second.values()) <= workers
