"""The encoders' preprocess, split between the loader's workers (uint8 pixels) and the device (float,
normalised): the very embeddings of the whole transform on the host; JPEG files decoded on the device, close to
the workers' embeddings; and loader workers that serve pass after pass."""

from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from pipeline.core.errors import ViclipError
from pipeline.encoders.base import on_tensors, split_preprocess
from pipeline.encoders.clip import load_clip
from pipeline.encoders.cnn import IMAGENET_MEAN, IMAGENET_STD, load_cnn
from pipeline.encoders.images import DeviceJpegs, FileLoader, encode_files, jpeg_bytes, jpeg_decoder, open_rgb

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list:
    """Real photographs in the colour modes users send, and synthetic images: noise at odd shapes, one smaller
    than any model's input, the extremes of the pixel range."""
    from skimage import data as photos  # here, not above: the GPU check imports `jpeg_gaps` where skimage is absent

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


JPEG_MAX_GAP, JPEG_MEAN_GAP = 8, 0.5  # levels of 255: libjpeg-turbo's or nvJPEG's decode and a tensor resize, against Pillow's


def jpeg_gaps(preprocess, files: list, device: torch.device) -> list[tuple[int, float]]:
    """Per JPEG file, the largest and the mean gap, in levels, between its pixels decoded on `device` and resized
    there (`DeviceJpegs`) and those Pillow decodes and resizes (`preprocess`)."""
    decoder, gaps = DeviceJpegs(on_tensors(preprocess), device), []
    for path in files:
        gap = (decoder([jpeg_bytes(path)])[0].cpu().int() - preprocess(open_rgb(path)).int()).abs()
        gaps.append((int(gap.max()), float(gap.float().mean())))
    return gaps


def encoded(encoder, files) -> tuple[dict[int, np.ndarray], list[tuple[int, str]]]:
    """Each good file's features by its index, and the bad files' errors: through the loader, 3 files a batch."""
    features, bad = {}, []
    for rows, batch, errors in encode_files(encoder, files, 3, 2, CPU):
        features |= {int(row): row_features for row, row_features in zip(rows, [] if batch is None else batch)}
        bad += errors
    return features, bad


@pytest.mark.parametrize("kind", ["clip", "cnn"])
def test_jpegs_decoded_on_the_device_give_the_workers_embeddings_within_tolerance(tiny_config, image_files, tmp_path,
                                                                                  monkeypatch, kind):
    """VICLIP_DEVICE_JPEGS=on on the CPU: the path a GPU takes (torchvision's decoder, in nvJPEG's place, and
    Resize on tensors). Libjpeg-turbo's pixels against Pillow's, resized on tensors against on images, differ by a
    few levels at most: the embeddings stay close. Other files (PNG, CMYK JPEG, a truncated JPEG) are the workers'
    own, and the bad ones are named as the workers name them."""
    from skimage import data as photos

    encoder = load_clip(tiny_config.clip, CPU) if kind == "clip" else load_cnn(tiny_config.cnn, CPU)
    Image.fromarray(photos.camera()).save(tmp_path / "camera.jpg")  # greyscale
    whole = (tmp_path / "camera.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    files = [*image_files, tmp_path / "camera.jpg", tmp_path / "truncated.jpg", tmp_path / "missing.jpg"]
    jpegs = {n for n, path in enumerate(files) if path.name in ("astronaut.jpg", "coffee.jpg", "camera.jpg")}

    monkeypatch.setenv("VICLIP_DEVICE_JPEGS", "off")
    assert jpeg_decoder(encoder, CPU) == "pillow"
    workers, workers_bad = encoded(encoder, files)
    monkeypatch.setenv("VICLIP_DEVICE_JPEGS", "on")
    assert jpeg_decoder(encoder, CPU) == "torchvision on cpu"
    device, device_bad = encoded(encoder, files)

    assert device_bad == workers_bad and [n for n, _ in device_bad] == [len(files) - 2, len(files) - 1]
    assert device.keys() == workers.keys()
    gaps = jpeg_gaps(encoder.preprocess, [files[n] for n in sorted(jpegs)], CPU)
    assert all(0 < most <= JPEG_MAX_GAP and mean < JPEG_MEAN_GAP for most, mean in gaps), gaps
    for n, features in device.items():
        if n in jpegs:  # the tiny models' random weights see little of it: the gate the GPU check holds CUDA to
            cosine = float(torch.cosine_similarity(torch.from_numpy(features).flatten(),
                                                   torch.from_numpy(workers[n]).flatten(), dim=0))
            assert cosine >= 0.999, (files[n].name, cosine)
        else:
            assert np.array_equal(features, workers[n]), files[n].name
    # A file the device's decoder refuses fails its whole call: the batch's JPEGs are then decoded as the workers do.
    def refuse(self, files):
        raise RuntimeError("nvJPEG: bad data")

    monkeypatch.setattr(DeviceJpegs, "__call__", refuse)
    fallen_back, fallen_back_bad = encoded(encoder, files)
    assert fallen_back_bad == workers_bad and fallen_back.keys() == workers.keys()
    assert all(np.array_equal(features, workers[n]) for n, features in fallen_back.items())


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


def test_jpegs_stay_with_pillow_where_a_preprocess_step_takes_images_alone(monkeypatch):
    monkeypatch.setenv("VICLIP_DEVICE_JPEGS", "on")
    ends = [transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))]
    resize, crop = transforms.Resize(8), transforms.CenterCrop(8)
    assert on_tensors(split_preprocess(transforms.Compose([resize, crop, *ends]))[0]).transforms == [resize, crop]
    other, _ = split_preprocess(transforms.Compose([resize, transforms.Lambda(lambda image: image), *ends]))
    assert on_tensors(other) is None
    assert jpeg_decoder(SimpleNamespace(preprocess=other), CPU) == "pillow"


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
