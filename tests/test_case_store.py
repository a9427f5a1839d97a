"""Random-access input: no start-up scan, reads only what the schedule asks for, 16 bits kept
until the crop, and the colour stage on the device equal to the host's."""

from __future__ import annotations

import io
import os

import jax
import numpy as np
import pytest
from PIL import Image

from medssl_jax import augment, augment_color, augment_device, case_store, datasets, input_pipeline
from medssl_jax.methods.base import Crops, Views
from medssl_jax.schedule import Schedule


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    datasets.load("demo/small", "train", data_dir=data_dir)  # prepares every split
    return data_dir


class _CountingSource:
    def __init__(self, source):
        self.source, self.read = source, []

    def __getitems__(self, keys):
        self.read.extend(keys)
        return self.source.__getitems__(keys)


def _counted(store):
    counter, original = {}, store.open_source

    def open_source():
        counter["s"] = _CountingSource(original())
        return counter["s"]

    store.open_source = open_source
    return counter


def test_metadata_is_stored_at_preparation_and_start_up_reads_no_record(demo_dir, monkeypatch):
    datasets.load("demo/small", "validation", data_dir=demo_dir)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the stored index was not used")

    monkeypatch.setattr(case_store, "build_index", no_rebuild)
    store, spec = datasets.load("demo/small", "validation", data_dir=demo_dir)
    builder = datasets.make_builder("demo/small", demo_dir)
    assert all(case_store.has_meta(builder, s) for s in builder.info.splits)
    assert store._source is None  # loading touched no record
    assert store.nbytes() < 200 * store.num_cases  # O(cases) metadata, no pixels
    counter = _counted(store)
    assert len(list(store)) == spec.num_cases
    assert sorted(counter["s"].read) == sorted(store.records.tolist())  # each record once


def test_index_is_memory_mapped_and_a_damaged_one_is_rebuilt(demo_dir):
    """The saved index round-trips, comes back memory-mapped (shared page cache, nothing read
    at start-up), and a folder that lost or truncated an array is rebuilt, not trusted."""
    store, _ = datasets.load("demo/small", "test", data_dir=demo_dir)
    assert isinstance(store.case_ids, np.memmap) and isinstance(store.offsets, np.memmap)
    with pytest.raises(ValueError, match="read-only"):
        store.labels[0] = 1  # the shared index cannot be changed by one process
    root = str(datasets.make_builder("demo/small", demo_dir).data_dir)
    [path] = [
        os.path.join(root, d)
        for d in os.listdir(root)
        if d.startswith("medssl_index-") and _same_cases(os.path.join(root, d), store)
    ]
    index = case_store.load_index(path)
    np.testing.assert_array_equal(index["case_id"], store.case_ids)
    expected = np.array(store.image_pos)
    short = os.path.join(path, "short.npy")  # (replaced, not rewritten: `store` maps the file)
    np.save(short, expected[:-1])
    os.replace(short, os.path.join(path, "image_pos.npy"))
    assert case_store.load_index(path) is None
    again, _ = datasets.load("demo/small", "test", data_dir=demo_dir)
    np.testing.assert_array_equal(again.image_pos, expected)
    assert case_store.load_index(path) is not None  # rewritten
    os.remove(os.path.join(path, "label.npy"))
    assert case_store.load_index(path) is None


def test_index_of_a_read_only_data_dir_goes_to_the_local_cache(demo_dir, tmp_path, monkeypatch):
    """A read-only (or gs://) data folder cannot hold the index: it is built once into the local
    cache and mapped from there at the next start, not rebuilt every time."""
    monkeypatch.setenv("MEDSSL_INDEX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.os, "access", lambda path, mode: False)
    store, _ = datasets.load("demo/small", "validation", data_dir=demo_dir)
    [cached] = os.listdir(tmp_path / "cache")
    assert "medssl_index-" in cached and isinstance(store.case_ids, np.memmap)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached index was rebuilt")

    monkeypatch.setattr(case_store, "build_index", no_rebuild)
    again, _ = datasets.load("demo/small", "validation", data_dir=demo_dir)
    np.testing.assert_array_equal(again.case_ids, store.case_ids)


def _same_cases(folder: str, store) -> bool:
    ids = np.load(os.path.join(folder, "case_id.npy"))
    return len(ids) == store.num_cases and bool(np.all(ids == store.case_ids))


def test_pipeline_reads_only_the_scheduled_records(demo_dir):
    store = input_pipeline.load_store({"name": "demo/small", "data_dir": demo_dir}, "train")
    counter = _counted(store)
    sched = Schedule(store.num_images, 8, 3)
    gen = input_pipeline.pretrain_elements(
        store, sched, batch_size=8, seed=3, start_step=5, multi_instance=False
    )
    elements = [next(gen) for _ in range(16)]  # steps 5 and 6
    case_of_row = np.repeat(np.arange(store.num_cases), store.counts)
    scheduled = [int(case_of_row[r]) for s in (5, 6) for r in sched.batch(s)]
    assert set(counter["s"].read) == {int(store.records[c]) for c in scheduled}
    assert [int(e["case_index"]) for e in elements] == scheduled


def test_a_rewritten_record_is_detected(demo_dir):
    store, _ = datasets.load("demo/small", "test", data_dir=demo_dir)
    store.case_ids = store.case_ids.copy()
    store.case_ids[0] = b"someone_else"
    with pytest.raises(case_store.StaleIndexError, match="delete the 'medssl_meta' folder"):
        store.read([(0, 0)])


def test_decode_float_keeps_16_bits():
    ramp = (np.arange(64 * 64, dtype=np.uint32) * 16 % 65536).astype(np.uint16).reshape(64, 64)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    out = datasets.decode_float(buf.getvalue()).numpy()
    assert out.shape == (64, 64, 3)
    np.testing.assert_array_equal(np.round(out[..., 0] * 65535).astype(np.uint16), ramp)
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    np.testing.assert_array_equal(
        datasets.decode_float(buf.getvalue()).numpy(),
        augment.to_float_image(rgb).numpy(),
    )


def test_colour_on_the_device_equals_colour_on_the_host(demo_dir):
    """Same (seed, step) -> the same crops; colour on the device differs from colour on the host
    only by where the uint8 rounding happens."""
    store = input_pipeline.load_store({"name": "demo/small", "data_dir": demo_dir}, "train")
    views = Views(Crops(2, 32, (0.3, 1.0)), Crops(2, 16, (0.1, 0.3)))
    aug = augment.recipe("simclr")
    kw = dict(batch_size=8, views=views, aug=aug, seed=1, start_step=2)
    host = next(input_pipeline.pretrain_dataset(store, **kw)[0].as_numpy_iterator())
    dev = next(
        input_pipeline.pretrain_dataset(store, color_on_device=True, **kw)[0].as_numpy_iterator()
    )
    assert host["views"].dtype == dev["views"].dtype == np.uint8
    assert dev["color_params"].shape == (8, 4, augment_color.NUM_COLOR_PARAMS)
    assert "color_params" not in host
    out = jax.jit(lambda b: augment_device.device_views(b, blur=True))(
        {k: dev[k] for k in ("views", "local_views", "color_params")}
    )
    assert set(out) == {"views", "local_views"}
    for key in ("views", "local_views"):
        ref = host[key].astype(np.float32) / 255
        diff = np.abs(np.asarray(out[key]) - ref)
        assert diff.mean() < 1.0 / 255 and diff.max() < 6.0 / 255, (key, diff.max())
    # The colour stage really ran on the device (not just the uint8 -> float conversion).
    plain = dev["views"].astype(np.float32) / 255
    assert np.abs(np.asarray(out["views"]) - plain).mean() > 10.0 / 255
