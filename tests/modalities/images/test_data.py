"""Image data: the built-in digits and folders of PNG/JPEG files, including bad files."""
from pathlib import Path

import numpy as np
import pytest
import torch
from multidiff.modalities.images import (
    DigitsDataset,
    EmptyImageFolderError,
    ImageFolderDataset,
    ImageFolderLayoutError,
    ImageSizeError,
    UnreadableImageError,
    digits_split,
)
from PIL import Image

# scikit-learn's digits: images per class 0..9
DIGIT_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


# -- digits ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    return {s: DigitsDataset(s) for s in ("train", "heldout", "all")}


def test_digits_sizes_shapes_and_range(digits):
    assert [len(digits[s]) for s in ("train", "heldout", "all")] == [1497, 300, 1797]
    full = digits["all"]
    x, _ = full.tensors()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32 and full.image_shape == (1, 8, 8)
    assert x.min() == -1.0 and x.max() == 1.0
    # integer values 0..16 map onto the grid k/8 - 1
    assert torch.equal((x + 1) * 8, ((x + 1) * 8).round())
    assert full.num_classes == 10 and full.class_names == tuple("0123456789")
    assert full.class_counts() == DIGIT_COUNTS
    image, label = digits["train"][5]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32 and isinstance(label, int) and 0 <= label < 10


def test_digits_split_is_disjoint_stratified_and_deterministic(digits):
    train, held = digits["train"].indices, digits["heldout"].indices
    assert len(set(train.tolist()) & set(held.tolist())) == 0
    assert sorted(train.tolist() + held.tolist()) == list(range(1797))
    counts = digits["heldout"].class_counts()
    assert sum(counts) == 300 and all(29 <= c <= 31 for c in counts), counts  # 300 * n_c / 1797 rounded
    assert [a + b for a, b in zip(counts, digits["train"].class_counts())] == DIGIT_COUNTS
    again = DigitsDataset("heldout")
    assert torch.equal(again.indices, held) and torch.equal(again.tensors()[0], digits["heldout"].tensors()[0])
    other = DigitsDataset("heldout", seed=1)
    assert not torch.equal(other.indices, held)
    labels = np.repeat(np.arange(3), [5, 3, 2])
    _, he = digits_split(labels, 5, seed=0)
    assert len(he) == 5 and np.bincount(labels[he], minlength=3).tolist() == [3, 1, 1]  # quotas 2.5, 1.5, 1.0


def test_digits_upscaling(digits):
    up = DigitsDataset("heldout", resize=16)
    assert up.image_shape == (1, 16, 16) and len(up) == 300
    x = up.tensors()[0]
    assert x.min() >= -1.0 and x.max() <= 1.0
    # nearest-neighbour 2x upscaling repeats every pixel in a 2x2 block
    near = DigitsDataset("heldout", resize=16, resample="nearest").tensors()[0]
    torch.testing.assert_close(near, digits["heldout"].tensors()[0].repeat_interleave(2, -1).repeat_interleave(2, -2))
    with pytest.raises(ValueError, match="unknown split 'test'"):
        DigitsDataset("test")
    with pytest.raises(ValueError, match="unknown resample 'lanczos'"):
        DigitsDataset(resample="lanczos")


# -- folders -----------------------------------------------------------------------------------

def save(path, size=(8, 8), value=128, mode="L", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = value if mode == "L" else (value, 255 - value, 0)
    Image.new(mode, (size[1], size[0]), colour).save(path, format=fmt)
    return path


@pytest.fixture
def folder(tmp_path):
    """cat: two good images; dog: one good, one corrupt, one 12x12 among 8x8 images, one JPEG."""
    root = tmp_path / "pets"
    save(root / "cat" / "a.png", value=0)
    save(root / "cat" / "b.png", value=255)
    save(root / "dog" / "c.png", value=100)
    save(root / "dog" / "sub" / "d.jpg", value=200, fmt="JPEG")
    (root / "dog" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    save(root / "dog" / "big.png", size=(12, 12))
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_folder_raises_naming_the_unreadable_file(folder):
    with pytest.raises(UnreadableImageError, match=r"bad\.png") as e:
        ImageFolderDataset(folder)
    assert e.value.path.endswith("bad.png")


def test_folder_raises_naming_the_wrongly_sized_file(folder):
    (folder / "dog" / "bad.png").unlink()
    with pytest.raises(ImageSizeError, match=r"big\.png is 12x12 .* images are 8x8 \(4 files\)"):
        ImageFolderDataset(folder)


def test_truncated_png_is_found_at_construction(tmp_path):
    root = tmp_path / "flat"
    save(root / "ok.png", size=(16, 16))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)).save(root / "cut.png")
    (root / "cut.png").write_bytes((root / "cut.png").read_bytes()[:60])  # header intact, data cut
    with pytest.raises(UnreadableImageError, match=r"cannot read image .*cut\.png"):
        ImageFolderDataset(root)


def test_folder_skip_reports_every_skipped_file(folder):
    with pytest.warns(UserWarning, match=r"4 images kept, 2 skipped"):
        ds = ImageFolderDataset(folder, on_error="skip")
    assert ds.class_names == ("cat", "dog") and ds.num_classes == 2
    assert len(ds) == 4 and ds.image_shape == (1, 8, 8)
    assert sorted(p.name for p in ds.files) == ["a.png", "b.png", "c.png", "d.jpg"]
    assert ds.labels.tolist() == [0, 0, 1, 1] and ds.class_counts() == [2, 2]
    assert sorted(Path(s.path).name for s in ds.skipped) == ["bad.png", "big.png"]
    reasons = {Path(s.path).name: s.reason for s in ds.skipped}
    assert "cannot read image" in reasons["bad.png"] and "12x12" in reasons["big.png"]
    assert any(p.endswith("notes.txt") for p in ds.ignored)
    assert "bad.png" in ds.report() and "big.png" in ds.report()
    meta = ds.meta()
    assert meta["class_names"] == ["cat", "dog"] and len(meta["skipped"]) == 2
    # pixel values: 0 -> -1, 255 -> +1
    img, label = ds[0]
    assert img.dtype == torch.float32 and label == 0 and torch.equal(img, torch.full((1, 8, 8), -1.0))
    assert torch.equal(ds[1][0], torch.full((1, 8, 8), 1.0))


def test_folder_resize_rgb_and_lazy_decoding(folder):
    with pytest.warns(UserWarning, match="1 skipped"):  # only the corrupt file now: big.png is resized
        ds = ImageFolderDataset(folder, resize=8, channels=3, on_error="skip")
    assert len(ds) == 5 and ds.image_shape == (3, 8, 8)
    x, _ = ds.tensors()
    assert x.shape == (5, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[0], torch.full((3, 8, 8), -1.0))  # black stays black in RGB
    with pytest.warns(UserWarning):
        lazy = ImageFolderDataset(folder, resize=(8, 8), channels=3, on_error="skip", cache=False)
    torch.testing.assert_close(lazy.tensors()[0], x, rtol=0, atol=0)
    with pytest.warns(UserWarning):
        tall = ImageFolderDataset(folder, resize=(16, 8), on_error="skip")
    assert tall.image_shape == (1, 16, 8)


def test_flat_folder_is_unconditional(tmp_path):
    for i in range(3):
        save(tmp_path / f"{i}.png", size=(4, 6))
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 3 and ds.num_classes == 0 and ds.class_names == () and ds.image_shape == (1, 4, 6)
    assert ds.labels.tolist() == [-1, -1, -1] and ds[2][1] == -1


def test_saved_class_mapping_is_reused(folder):
    with pytest.warns(UserWarning):
        ds = ImageFolderDataset(folder, on_error="skip", class_names=["bird", "cat", "dog"])
    assert ds.num_classes == 3 and ds.labels.tolist() == [1, 1, 2, 2] and ds.class_counts() == [0, 2, 2]
    with pytest.raises(ImageFolderLayoutError, match=r"class folder\(s\) \['dog'\] .* not among"):
        ImageFolderDataset(folder, on_error="skip", class_names=["cat"])


def test_bad_folders_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EmptyImageFolderError, match=r"no image files \(.png, .jpg, .jpeg\) in .*empty"):
        ImageFolderDataset(empty)
    (empty / "readme.txt").write_text("x")
    (empty / "cls").mkdir()
    with pytest.raises(EmptyImageFolderError):
        ImageFolderDataset(empty)
    mixed = tmp_path / "mixed"
    save(mixed / "top.png")
    save(mixed / "cls" / "x.png")
    with pytest.raises(ImageFolderLayoutError, match=r"mixes images at the top level \(e.g. top\.png\)"):
        ImageFolderDataset(mixed)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"garbage")
    with pytest.raises(EmptyImageFolderError, match=r"all 1 candidate files were skipped.*x\.png"):
        ImageFolderDataset(broken, on_error="skip")
    with pytest.raises(ValueError, match="unknown on_error 'ignore'"):
        ImageFolderDataset(mixed, on_error="ignore")
    with pytest.raises(ValueError, match="unknown channels 4"):
        ImageFolderDataset(mixed, channels=4)


def test_sixteen_bit_png_is_rescaled_not_clipped(tmp_path):
    arr = np.full((4, 4), 65535, dtype=np.uint16)
    arr[0, 0] = 0
    Image.fromarray(arr).save(tmp_path / "deep.png")
    x = ImageFolderDataset(tmp_path)[0][0]
    assert x[0, 0, 0] == -1.0 and x[0, 1, 1] == 1.0
