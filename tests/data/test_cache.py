"""The decoded-image cache: same items as the plain path (bit-identical for evaluation, within
resize tolerance for random crops), reuse across datasets, invalidation, switches, limits."""

import io
import math
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visiontune.data.cache import SHRINK_MARGIN, DecodedImageCache, plan_for
from visiontune.data.dataset import ImageDataset
from visiontune.data.images import load_image
from visiontune.data.sources import Record
from visiontune.data.transforms import Preprocessing, eval_transform, hwc_tensor, train_transform
from visiontune.errors import DataError
from visiontune.inputs import MULTICLASS

PRE = Preprocessing(height=96, width=112, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _photos():
    from sklearn.datasets import load_sample_images

    return [np.asarray(image) for image in load_sample_images().images]  # 427 x 640 RGB


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory) -> list[Path]:
    """Realistic images in the forms the data layer meets: large JPEGs, an EXIF-rotated JPEG,
    a PNG with alpha, a grayscale JPEG, a small JPEG."""
    root = tmp_path_factory.mktemp("photos")
    china, flower = _photos()
    files = []

    def save(name, image, **kwargs):
        path = root / name
        image.save(path, **kwargs)
        files.append(path)

    save("china.jpg", Image.fromarray(china), quality=90)
    save("flower.jpg", Image.fromarray(flower), quality=90)
    big = Image.fromarray(flower).resize((1000, 667), Image.Resampling.BICUBIC)
    save("big.jpg", big, quality=92)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: width and height swap when shown
    save("rotated.jpg", Image.fromarray(china), quality=90, exif=exif)
    rgba = Image.fromarray(flower).convert("RGBA")
    rgba.putalpha(200)
    save("alpha.png", rgba)
    save("gray.jpg", Image.fromarray(china).convert("L"), quality=90)
    save("small.jpg", Image.fromarray(china).resize((120, 80)), quality=90)
    return files


def records(files) -> list[Record]:
    return [Record(str(f), "a" if i % 2 else "b", f"rows.jsonl:{i + 1}") for i, f in enumerate(files)]


def dataset(files, transform, cache: bool, cache_dir) -> ImageDataset:
    return ImageDataset(records(files), ["a", "b"], MULTICLASS, transform, image_cache=cache,
                        cache_dir=str(cache_dir))


def test_plans_follow_the_transforms():
    assert plan_for(eval_transform(PRE)).kind == "exact"
    assert plan_for(eval_transform(PRE)).size == (96, 112)
    shrink = plan_for(train_transform(PRE, augment=True))
    assert shrink.kind == "shrink" and shrink.size[0] == math.ceil(SHRINK_MARGIN * 112)
    assert plan_for(train_transform(PRE, augment=False)).kind == "exact"
    assert plan_for(lambda x: x) is None  # an unknown transform keeps the plain path
    from torchvision.transforms import v2

    assert plan_for(v2.Compose([v2.CenterCrop(50)])) is None


def test_evaluation_items_are_bit_identical(photo_files, tmp_path):
    plain = dataset(photo_files, eval_transform(PRE), False, tmp_path)
    cached = dataset(photo_files, eval_transform(PRE), True, tmp_path)
    assert plain._entries is None and all(e is not None for e in cached._entries)
    for i in range(len(photo_files)):
        a, b = plain[i], cached[i]
        assert torch.equal(a["pixel_values"], b["pixel_values"]), photo_files[i].name
        assert torch.equal(a["labels"], b["labels"])
        assert b["pixel_values"].is_contiguous()


def test_training_without_augmentations_is_bit_identical(photo_files, tmp_path):
    transform = train_transform(PRE, augment=False)
    plain = dataset(photo_files, transform, False, tmp_path)
    cached = dataset(photo_files, transform, True, tmp_path)
    for i in range(len(photo_files)):
        assert torch.equal(plain[i]["pixel_values"], cached[i]["pixel_values"])


def test_shrunk_entries_are_the_transforms_resize_of_the_full_image(photo_files, tmp_path):
    transform = train_transform(PRE, augment=True)
    cached = dataset(photo_files, transform, True, tmp_path)
    side = math.ceil(SHRINK_MARGIN * 112)
    from torchvision.transforms.v2 import functional as F

    for i, path in enumerate(photo_files):
        stored = cached.pixels(i)
        full = hwc_tensor(load_image(str(path)))
        height, width = full.shape[-2:]
        if min(height, width) <= side:  # never enlarged: the full image itself
            assert torch.equal(stored, full), path.name
            continue
        assert min(stored.shape[-2:]) == side
        assert abs(stored.shape[-1] / stored.shape[-2] - width / height) < 0.02
        assert torch.equal(stored, F.resize(full, list(stored.shape[-2:]), antialias=True)), path.name


def test_random_crops_match_the_plain_path_within_resize_tolerance(tmp_path):
    """The same crop from the cached and from the fully decoded image gives nearly the same
    output: large crops are shrunk in two antialiased steps instead of one; the smallest are
    enlarged from fewer pixels (a little softer). The photo is 4x the cached size, so the
    crop boxes line up exactly in both."""
    from torchvision.transforms.v2 import functional as F

    china, flower = _photos()
    files = []
    for name, array in (("china", china), ("flower", flower)):
        files.append(tmp_path / f"{name}.jpg")
        Image.fromarray(array).resize((1344, 896), Image.Resampling.BICUBIC).save(files[-1], quality=92)
    transform = train_transform(PRE, augment=True)  # cache side 224: 896 x 1344 -> 224 x 336
    cached = dataset(files, transform, True, tmp_path / "cache")
    for i, path in enumerate(files):
        small, full = cached.pixels(i), hwc_tensor(load_image(str(path)))
        assert small.shape[-2:] == (224, 336)
        # (top, left, height, width) in the cached image; x4 in the full one. Area shares
        # 100 %, 50 %, 25 %, 8 % (RandomResizedCrop's smallest).
        for box, tolerance in (((0, 0, 224, 336), 1.0), ((40, 60, 160, 236), 1.5),
                               ((56, 84, 112, 168), 2.5), ((80, 120, 64, 96), 7.0)):
            a = F.resized_crop(small, *box, [96, 112], antialias=True).float()
            b = F.resized_crop(full, *(4 * v for v in box), [96, 112], antialias=True).float()
            diff = (a - b).abs().mean()
            assert diff < tolerance, (path.name, box, float(diff))  # of 255 levels
    item = cached[0]["pixel_values"]
    assert item.shape == (3, 96, 112) and item.dtype == torch.float32


def test_entries_are_reused_without_decoding(photo_files, tmp_path, monkeypatch):
    first = dataset(photo_files, eval_transform(PRE), True, tmp_path)
    expected = [first[i]["pixel_values"] for i in range(len(first))]

    def fail(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr("visiontune.data.dataset.load_image", fail)
    monkeypatch.setattr("visiontune.data.images.load_image", fail)
    monkeypatch.setattr("visiontune.data.images.decode_image", fail)
    second = dataset(photo_files, eval_transform(PRE), True, tmp_path)
    for i in range(len(second)):
        assert torch.equal(second[i]["pixel_values"], expected[i])


def test_a_changed_file_is_decoded_again(tmp_path):
    china, flower = _photos()
    path = tmp_path / "img.jpg"
    Image.fromarray(china).save(path, quality=90)
    cache_dir = tmp_path / "cache"
    before = dataset([path], eval_transform(PRE), True, cache_dir)[0]["pixel_values"]
    time.sleep(0.01)
    Image.fromarray(flower).save(path, quality=90)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 5_000_000))
    after = dataset([path], eval_transform(PRE), True, cache_dir)[0]["pixel_values"]
    plain = dataset([path], eval_transform(PRE), False, cache_dir)[0]["pixel_values"]
    assert torch.equal(after, plain) and not torch.equal(before, after)


def test_a_same_size_replacement_with_the_old_times_is_not_served_stale(tmp_path):
    """Image B written over image A in place (same file, same byte size), then A's access and
    modification times set back with os.utime, at once: the cache gives B's pixels."""
    rng = np.random.default_rng(1)
    path = tmp_path / "img.bmp"  # uncompressed: every 64 x 48 image has the same byte size
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    cache_dir = tmp_path / "cache"
    first = dataset([path], eval_transform(PRE), True, cache_dir)
    assert first._entries[0] is not None
    before = first[0]["pixel_values"]
    old = os.stat(path)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buffer, "BMP")
    with open(path, "r+b") as out:
        out.write(buffer.getvalue())
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    new = os.stat(path)
    assert (new.st_size, new.st_mtime_ns, new.st_ino) == (old.st_size, old.st_mtime_ns, old.st_ino)
    again = dataset([path], eval_transform(PRE), True, cache_dir)
    plain = dataset([path], eval_transform(PRE), False, cache_dir)[0]["pixel_values"]
    assert not torch.equal(plain, before)
    assert torch.equal(again[0]["pixel_values"], plain), "served A's pixels for B"
    assert again._entries[0] is not None  # B is cached now, beside A's entry


def test_identical_files_share_one_entry(photo_files, tmp_path):
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(photo_files[0].read_bytes())
    ds = dataset([photo_files[0], copy], eval_transform(PRE), True, tmp_path / "cache")
    assert ds._entries[0] == ds._entries[1]
    assert torch.equal(ds[0]["pixel_values"], ds[1]["pixel_values"])


def test_switches(photo_files, tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONTUNE_IMAGE_CACHE_DIR", str(tmp_path / "by_env"))
    monkeypatch.setenv("VISIONTUNE_IMAGE_CACHE", "0")
    off = ImageDataset(records(photo_files[:2]), ["a", "b"], MULTICLASS, eval_transform(PRE))
    assert off._entries is None and not (tmp_path / "by_env").exists()
    monkeypatch.setenv("VISIONTUNE_IMAGE_CACHE", "1")
    on = ImageDataset(records(photo_files[:2]), ["a", "b"], MULTICLASS, eval_transform(PRE))
    assert on._entries is not None and (tmp_path / "by_env").is_dir()
    assert torch.equal(on[0]["pixel_values"], off[0]["pixel_values"])
    explicit_off = ImageDataset(records(photo_files[:2]), ["a", "b"], MULTICLASS,
                                eval_transform(PRE), image_cache=False)
    assert explicit_off._entries is None


def test_bad_and_remote_images_take_the_plain_path(photo_files, tmp_path, refused_port):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(photo_files[0].read_bytes()[:5000])
    missing = tmp_path / "missing.jpg"
    rows = records([photo_files[0], broken, missing])
    rows.append(Record(f"http://127.0.0.1:{refused_port}/never.jpg", "a", "rows.jsonl:4"))
    ds = ImageDataset(rows, ["a", "b"], MULTICLASS, eval_transform(PRE), image_cache=True,
                      cache_dir=str(tmp_path / "cache"))
    assert ds._entries[0] is not None and ds._entries[1:] == [None, None, None]
    with pytest.raises(DataError, match=r"rows.jsonl:2: .*truncated or corrupt"):
        ds[1]
    with pytest.raises(DataError, match=r"rows.jsonl:3: image not found"):
        ds[2]
    assert DecodedImageCache(plan_for(eval_transform(PRE)), tmp_path).entry_path(rows[3].image) is None


def test_size_limit_leaves_the_rest_uncached(photo_files, tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONTUNE_IMAGE_CACHE_MAX_GB", str(60_000 / (1 << 30)))  # two entries
    ds = dataset(photo_files, eval_transform(PRE), True, tmp_path)
    assert 1 <= sum(e is not None for e in ds._entries) < len(photo_files)
    plain = dataset(photo_files, eval_transform(PRE), False, tmp_path)
    for i in range(len(ds)):
        assert torch.equal(ds[i]["pixel_values"], plain[i]["pixel_values"])


def test_a_corrupt_entry_is_ignored(photo_files, tmp_path):
    ds = dataset(photo_files[:1], eval_transform(PRE), True, tmp_path)
    Path(ds._entries[0]).write_bytes(b"not an array")
    plain = dataset(photo_files[:1], eval_transform(PRE), False, tmp_path)
    assert torch.equal(ds[0]["pixel_values"], plain[0]["pixel_values"])


def test_entries_read_back_as_written_and_truncated_ones_are_ignored(tmp_path):
    """The header-matching reader against np.load, and its fallbacks."""
    cache = DecodedImageCache(plan_for(eval_transform(PRE)), tmp_path)
    rng = np.random.default_rng(0)
    for shape in [(1, 1, 3), (96, 112, 3), (257, 1003, 3), (12000, 2, 3)]:
        pixels = torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8)).permute(2, 0, 1)
        entry = tmp_path / f"{shape[0]}x{shape[1]}.npy"
        cache.write(entry, pixels)
        read = DecodedImageCache.read(entry)
        assert read.dtype == torch.uint8 and torch.equal(read, pixels)
        assert read.permute(1, 2, 0).is_contiguous()  # channels-last strides, as documented
    # Not what an entry holds: a different header goes through np.load and is then refused.
    other = tmp_path / "other.npy"
    np.save(other, np.zeros((4, 5), np.float32))
    assert DecodedImageCache.read(other) is None
    fortran = tmp_path / "fortran.npy"
    np.save(fortran, np.asfortranarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)))
    assert torch.equal(DecodedImageCache.read(fortran),
                       torch.from_numpy(np.load(fortran).copy()).permute(2, 0, 1))
    whole = (tmp_path / "96x112.npy").read_bytes()
    truncated = tmp_path / "truncated.npy"
    truncated.write_bytes(whole[:-1])
    assert DecodedImageCache.read(truncated) is None
    assert DecodedImageCache.read(tmp_path / "missing.npy") is None


def test_data_loader_workers_read_the_cache(photo_files, tmp_path):
    ds = dataset(photo_files, eval_transform(PRE), True, tmp_path)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    batches = list(loader)
    stacked = torch.cat([b["pixel_values"] for b in batches])
    plain = dataset(photo_files, eval_transform(PRE), False, tmp_path)
    assert torch.equal(stacked, torch.stack([plain[i]["pixel_values"] for i in range(len(plain))]))


class ReadOnThreadsOnly(ImageDataset):
    """Refuses to read an image outside the batch-reading threads."""

    def pixels(self, index):
        if not threading.current_thread().name.startswith("visiontune-read"):
            raise RuntimeError(f"item {index} read on {threading.current_thread().name}")
        return super().pixels(index)


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "decoded"])
def test_a_worker_reads_a_batch_s_images_on_threads_with_the_same_items(photo_files, tmp_path,
                                                                         cache, monkeypatch):
    """The images of a batch are read by threads together (a read may wait on the disk); the
    augmented items are those ``__getitem__`` gives one by one."""
    transform = train_transform(PRE, augment=True)
    threaded = ReadOnThreadsOnly(records(photo_files), ["a", "b"], MULTICLASS, transform,
                                 image_cache=cache, cache_dir=str(tmp_path), seed=7)
    loader = torch.utils.data.DataLoader(threaded, batch_size=4, num_workers=1)
    got = torch.cat([b["pixel_values"] for b in loader])
    plain = ImageDataset(records(photo_files), ["a", "b"], MULTICLASS, transform, image_cache=cache,
                         cache_dir=str(tmp_path), seed=7)
    assert torch.equal(got, torch.stack([plain[i]["pixel_values"] for i in range(len(plain))]))
    monkeypatch.setenv("VISIONTUNE_BATCH_READ_THREADS", "1")  # one after another
    with pytest.raises(RuntimeError, match="read on MainThread"):
        next(iter(torch.utils.data.DataLoader(threaded, batch_size=4, num_workers=1)))


def test_a_bad_image_read_on_a_thread_still_names_its_row(photo_files, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    files = [*photo_files[:3], bad]
    ds = dataset(files, eval_transform(PRE), False, tmp_path)
    with pytest.raises(DataError, match="rows.jsonl:4"):
        next(iter(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1)))


def test_fill_is_safe_with_parallel_writers(photo_files, tmp_path):
    """Two fills of the same entries at once (threads here; data-loader workers or ranks in
    practice): every entry ends up whole."""
    from concurrent.futures import ThreadPoolExecutor

    plan = plan_for(eval_transform(PRE))
    first = eval_transform(PRE).transforms[0]
    caches = [DecodedImageCache(plan, tmp_path, first_step=first) for _ in range(2)]
    uris = [str(f) for f in photo_files]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda c: c.fill(uris, workers=2), caches))
    for uri in uris:
        entry = caches[0].entry_path(uri)
        assert DecodedImageCache.read(entry) is not None
    assert not list(tmp_path.rglob(".part-*"))


def small_jpegs(folder: Path, count: int, start: int = 0) -> list[str]:
    """Distinct small JPEGs (one cache entry each, of the same size)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(start, start + count):
        pixels = np.random.default_rng(index).integers(0, 255, (40, 50, 3), dtype=np.uint8)
        path = folder / f"{index}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def test_the_size_limit_is_kept_by_evicting_the_least_recently_used(tmp_path, caplog):
    plan = plan_for(eval_transform(PRE))
    entry_bytes = 96 * 112 * 3
    cache = DecodedImageCache(plan, tmp_path / "cache", limit_bytes=10 * (entry_bytes + 128),
                              first_step=eval_transform(PRE).transforms[0])
    old = small_jpegs(tmp_path / "img", 6)
    assert cache.fill(old)[0]["added"] == 6
    # Last used at different times: the three used longest ago go first.
    for age, uri in enumerate(old):
        stamp = time.time() - 3600 * (10 - age)
        os.utime(cache.entry_path(uri), (stamp, stamp))
    new = small_jpegs(tmp_path / "img", 6, start=100)
    with caplog.at_level("INFO", logger="visiontune.data.cache"):
        stats, present = cache.fill(new)
    assert stats["added"] == 6 and set(present) == set(new)
    assert cache.size_bytes() <= cache.limit_bytes
    kept = [cache.entry_path(uri).is_file() for uri in old]
    assert kept == [False, False, True, True, True, True]
    assert "removed 2 least recently used entries" in caplog.text


def test_entries_the_current_data_use_are_never_evicted(tmp_path, caplog):
    """Data larger than the limit: cached up to it (reused entries first), the rest decoded from
    the source at each use, and one warning says so."""
    plan = plan_for(eval_transform(PRE))
    cache = DecodedImageCache(plan, tmp_path / "cache", limit_bytes=4 * (96 * 112 * 3 + 128),
                              first_step=eval_transform(PRE).transforms[0])
    images = small_jpegs(tmp_path / "img", 7)
    assert cache.fill(images[:3])[0]["added"] == 3
    stale = time.time() - 7200
    for uri in images[:3]:
        os.utime(cache.entry_path(uri), (stale, stale))
    with caplog.at_level("INFO", logger="visiontune.data.cache"):
        stats, present = cache.fill(images)
    assert (stats["cached"], stats["added"], stats["over_limit"]) == (3, 1, 3)
    assert all(uri in present for uri in images[:3])  # reused: used now, not evicted
    assert "removed" not in caplog.text
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "3 of 7 image(s) not cached" in warnings[0].getMessage()
    ds = ImageDataset(records([Path(u) for u in images]), ["a", "b"], MULTICLASS,
                      eval_transform(PRE), image_cache=True, cache_dir=str(tmp_path / "cache"))
    plain = dataset([Path(u) for u in images], eval_transform(PRE), False, tmp_path)
    for i in range(len(images)):
        assert torch.equal(ds[i]["pixel_values"], plain[i]["pixel_values"])


def test_remote_images_are_cached_from_their_downloaded_copy(photo_files, tmp_path, monkeypatch):
    import functools
    import http.server
    import threading

    monkeypatch.setenv("VISIONTUNE_CACHE_DIR", str(tmp_path / "downloads"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(photo_files[0].parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{photo_files[0].name}"
        rows = [Record(url, "a", "rows.jsonl:1")]
        ds = ImageDataset(rows, ["a", "b"], MULTICLASS, eval_transform(PRE), image_cache=True,
                          cache_dir=str(tmp_path / "cache"))
    finally:
        server.shutdown()
    assert ds._entries[0] is not None  # filled before training: no fetch or decode per epoch
    plain = dataset(photo_files[:1], eval_transform(PRE), False, tmp_path)
    assert torch.equal(ds[0]["pixel_values"], plain[0]["pixel_values"])
