"""MICLe: bag sampling over cases, patient-unique batches, and the loss on pairs."""

import collections

import jax
import numpy as np
import pytest

from medssl_jax import config_lib, input_pipeline, pretrain, sharding
from medssl_jax.schedule import Schedule
from tests.utils import synthetic_pretrain_batch, tiny_pretrain_config

BATCH = 32
STEPS = 40  # > 2 epochs of the demo train split's cases at this batch size


@pytest.fixture(scope="module")
def store(tfds_data_dir):
    return input_pipeline.load_store({"name": "demo", "data_dir": tfds_data_dir}, "train")


def _elements(store, *, patient_unique=True, start_step=0, steps=STEPS, seed=0):
    items = np.stack([np.arange(store.num_cases), np.zeros(store.num_cases, np.int64)], 1)
    keys = store.patient_keys if patient_unique else None
    sched = Schedule(len(items), BATCH, seed, patient_keys=keys)
    gen = input_pipeline.pretrain_elements(
        store,
        sched,
        items,
        batch_size=BATCH,
        seed=seed,
        start_step=start_step,
        multi_instance=True,
    )
    return [[next(gen) for _ in range(BATCH)] for _ in range(steps)]


def test_demo_has_multi_image_single_image_and_multi_case_patients(store):
    sizes = [len(x) for x in store.images]
    assert min(sizes) == 1 and max(sizes) >= 3
    assert len(set(store.patient_keys.tolist())) < store.num_cases


def test_pairs_come_from_one_case_and_are_distinct_when_possible(store):
    batches = _elements(store)
    seen_single = 0
    for batch in batches:
        for el in batch:
            c = int(el["case_index"])
            i, j = (int(x) for x in el["pair"])
            imgs = store.images[c]
            assert el["a"] == imgs[i]
            if len(imgs) >= 2:
                assert i != j and el["distinct"] == 1.0 and el["b"] == imgs[j]
            else:  # single-image case: two views of its one image, still trained
                assert i == j == 0 and el["distinct"] == 0.0 and el["b"] == b""
                seen_single += 1
            assert el["patient_key"] == store.patient_keys[c]
    assert seen_single > 0


def test_no_batch_holds_two_cases_of_one_patient(store):
    for batch in _elements(store):
        keys = [int(el["patient_key"]) for el in batch]
        assert len(set(keys)) == len(keys)
    # ...which the demo data would violate without the constraint.
    collisions = sum(
        len({int(e["patient_key"]) for e in b}) < len(b)
        for b in _elements(store, patient_unique=False)
    )
    assert collisions > 0


def test_pairs_are_redrawn_at_every_visit(store):
    pairs = collections.defaultdict(set)
    for batch in _elements(store, steps=80):
        for el in batch:
            pairs[int(el["case_index"])].add(tuple(int(x) for x in el["pair"]))
    big = [c for c, p in pairs.items() if len(store.images[c]) >= 3]
    assert big and np.mean([len(pairs[c]) > 1 for c in big]) > 0.5


def test_elements_are_a_pure_function_of_the_step(store):
    full = _elements(store, steps=12)
    resumed = _elements(store, start_step=7, steps=5)
    for a, b in zip(full[7:], resumed, strict=True):
        assert [e["pair"].tolist() for e in a] == [e["pair"].tolist() for e in b]
        assert [int(e["case_index"]) for e in a] == [int(e["case_index"]) for e in b]
        assert [e["seed"].tolist() for e in a] == [e["seed"].tolist() for e in b]


def test_augmented_batches_have_views_and_distinct_share(store):
    config = tiny_pretrain_config("micle")
    ds, _ = input_pipeline.pretrain_dataset(
        store,
        batch_size=16,
        image_size=32,
        aug=config_lib.augment_kwargs(config),
        seed=0,
        multi_instance=True,
        patient_unique=True,
    )
    b = next(ds.as_numpy_iterator())
    assert b["views"].shape == (16, 2, 32, 32, 3) and b["views"].dtype == np.float32
    assert 0.0 <= b["views"].min() and b["views"].max() <= 1.0
    assert 0 < b["distinct"].mean() <= 1
    assert not np.allclose(b["views"][:, 0], b["views"][:, 1])
    assert config.method == "micle"


def test_micle_loss_equals_simclr_loss_on_the_same_pairs():
    """The MICLe step is SimCLR's NT-Xent on the pairs it is given (same batch -> same loss)."""
    batch = synthetic_pretrain_batch(0, 16, 32, 5)
    mesh = sharding.make_mesh()
    losses = {}
    for method in ("simclr", "micle"):
        config = tiny_pretrain_config(method)
        built = pretrain.build(
            config, mesh, num_classes=5, label_kind="multiclass", total_steps=4, warmup_steps=1
        )
        state = built.init(jax.random.key(0))
        _, m = built.step(state, sharding.to_global(batch, mesh))
        losses[method] = jax.device_get(m)
    for k in ("contrastive_loss", "contrastive_acc", "loss"):
        np.testing.assert_allclose(losses["simclr"][k], losses["micle"][k], rtol=1e-6)
    np.testing.assert_allclose(losses["micle"]["distinct_pairs"], batch["distinct"].mean())
