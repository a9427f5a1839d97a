"""MICLe: bag sampling over cases, patient-unique batches, and the loss on pairs."""

import collections

import jax
import numpy as np
import pytest

from medssl_jax import config_lib, input_pipeline, methods, pretrain, sharding
from medssl_jax.schedule import Schedule
from tests.utils import synthetic_pretrain_batch, tiny_pretrain_config

BATCH = 32
STEPS = 40  # > 2 epochs of the demo train split's cases at this batch size


@pytest.fixture(scope="module")
def store(tfds_data_dir):
    return input_pipeline.load_store({"name": "demo", "data_dir": tfds_data_dir}, "train")


def _elements(store, *, patient_unique=True, start_step=0, steps=STEPS, seed=0):
    keys = store.patient_keys if patient_unique else None
    sched = Schedule(store.num_cases, BATCH, seed, patient_keys=keys)
    gen = input_pipeline.pretrain_elements(
        store,
        sched,
        batch_size=BATCH,
        seed=seed,
        start_step=start_step,
        multi_instance=True,
    )
    return [[next(gen) for _ in range(BATCH)] for _ in range(steps)]


def test_demo_has_multi_image_single_image_and_multi_case_patients(store):
    sizes = store.counts.tolist()
    assert min(sizes) == 1 and max(sizes) >= 3
    assert len(set(store.patient_keys.tolist())) < store.num_cases


def test_pairs_come_from_one_case_and_are_distinct_when_possible(store):
    batches = _elements(store)
    seen_single = 0
    for batch in batches:
        for el in batch:
            c = int(el["case_index"])
            i, j = (int(x) for x in el["pair"])
            imgs = store.case(c)["images"]
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
    big = [c for c, p in pairs.items() if store.counts[c] >= 3]
    assert big and np.mean([len(pairs[c]) > 1 for c in big]) > 0.5


def test_elements_are_a_pure_function_of_the_step(store):
    full = _elements(store, steps=12)
    resumed = _elements(store, start_step=7, steps=5)
    for a, b in zip(full[7:], resumed, strict=True):
        assert [e["pair"].tolist() for e in a] == [e["pair"].tolist() for e in b]
        assert [int(e["case_index"]) for e in a] == [int(e["case_index"]) for e in b]
        assert [e["seed"].tolist() for e in a] == [e["seed"].tolist() for e in b]


def _training_batches(store, config, steps=6, batch=16):
    """Batches exactly as pretraining makes them (pretrain.sampler_options + the method's views)."""
    views = methods.get(config.method).views(config)
    ds, _ = input_pipeline.pretrain_dataset(
        store,
        batch_size=batch,
        views=views,
        aug=config_lib.augment_kwargs(config),
        seed=0,
        **pretrain.sampler_options(config),
    )
    it = ds.as_numpy_iterator()
    return [next(it) for _ in range(steps)]


@pytest.mark.parametrize("config_name", ["micle", "swav"])
def test_training_input_path_pairs_images_and_keeps_patients_unique(store, config_name):
    """Through the real training path: MICLe pairing (for SimCLR, and for SwAV with its local
    crops) gives distinct images and no patient twice in a batch; without pairing, the same
    patients do collide and both views come from one image."""
    config = tiny_pretrain_config(config_name)
    if config_name == "swav":
        config.sampler.multi_instance = True
    batches = _training_batches(store, config)
    n_local = config.crops.num_local
    for b in batches:
        keys = b["patient_key"].tolist()
        assert len(set(keys)) == len(keys), "a patient appears twice in a MICLe batch"
        assert b["views"].shape == (16, 2, 32, 32, 3) and b["views"].dtype == np.uint8
        assert b["views"].max() > b["views"].min()
        if n_local:
            assert b["local_views"].shape == (16, n_local, 16, 16, 3)
        multi = [store.counts[c] >= 2 for c in b["case_index"]]
        np.testing.assert_array_equal(b["distinct"], np.asarray(multi, np.float32))
        assert all((i != j) == m for (i, j), m in zip(b["pair"], multi, strict=True))
    assert 0 < np.mean([b["distinct"].mean() for b in batches]) < 1
    # Without the sampler options: patients collide somewhere, and pairs are never distinct.
    config.sampler.multi_instance = False
    plain = _training_batches(store, config, steps=20)
    assert all(b["distinct"].sum() == 0 for b in plain)
    assert any(len(set(b["patient_key"].tolist())) < 16 for b in plain)


@pytest.mark.parametrize("config_name", ["micle", "hybrid"])
def test_mask_option_only_removes_same_patient_negatives(config_name):
    """same_patient='mask' changes the (contrastive) loss exactly when a batch holds two rows
    of one patient; with unique patients it equals plain NT-Xent. Hybrid's NT-Xent term too."""
    batch = synthetic_pretrain_batch(0, 16, 32, 5)
    mesh = sharding.make_mesh()
    out = {}
    for name, keys in (("dup", batch["patient_key"]), ("unique", np.arange(16, dtype=np.int32))):
        for mode in ("exclude", "mask"):
            config = tiny_pretrain_config(config_name)
            config.sampler.multi_instance = True
            config.sampler.same_patient = mode
            built = pretrain.build(
                config, mesh, num_classes=5, label_kind="multiclass", total_steps=4, warmup_steps=1
            )
            state = built.init(jax.random.key(0))
            b = dict(batch, patient_key=keys)
            _, m = built.step(state, sharding.to_global(b, mesh))
            out[name, mode] = float(jax.device_get(m)["contrastive_loss"])
    assert len(set(batch["patient_key"].tolist())) < 16
    assert out["dup", "mask"] < out["dup", "exclude"] - 1e-4  # fewer negatives, lower loss
    np.testing.assert_allclose(out["unique", "mask"], out["unique", "exclude"], rtol=1e-6)


def test_distinct_prob_mixes_micle_and_simclr_pairs(store):
    """sampler.distinct_prob: that fraction of multi-image cases gives two images, the rest one
    image twice; 1.0 is plain MICLe, bit for bit; the draws are a pure function of the step."""
    config = tiny_pretrain_config("micle")
    multi = store.counts >= 2
    fractions = {}
    for p in (0.0, 0.5, 1.0):
        config.sampler.distinct_prob = p
        config_lib.validate(config)
        batches = _training_batches(store, config, steps=10)
        on_multi = np.concatenate([b["distinct"][multi[b["case_index"]]] for b in batches])
        fractions[p] = on_multi.mean()
        for b in batches:
            i, j = b["pair"].T
            np.testing.assert_array_equal(b["distinct"], (i != j).astype(np.float32))
            assert not b["distinct"][~multi[b["case_index"]]].any()
    assert fractions[0.0] == 0.0 and fractions[1.0] == 1.0
    assert 0.35 < fractions[0.5] < 0.65, fractions
    config.sampler.distinct_prob = 0.5
    again = _training_batches(store, config, steps=10)
    b0 = _training_batches(store, config, steps=10)
    for a, b in zip(again, b0, strict=True):
        np.testing.assert_array_equal(a["pair"], b["pair"])
        np.testing.assert_array_equal(a["views"], b["views"])


def test_image_items_visit_every_image_once_per_epoch_paired_within_its_case(store):
    """sampler.epoch_over='images': epochs over images (as SimCLR), each paired with ANOTHER
    image of its case, batches still patient-unique."""
    keys = store.patient_keys[store.locate(np.arange(store.num_images))[0]]
    sched = Schedule(store.num_images, BATCH, 0, patient_keys=keys)
    gen = input_pipeline.pretrain_elements(
        store, sched, batch_size=BATCH, seed=0, start_step=0, multi_instance=True, image_items=True
    )
    steps = sched.epoch(0).shape[0]
    firsts = collections.Counter()
    for _ in range(steps):
        batch = [next(gen) for _ in range(BATCH)]
        assert len({int(e["patient_key"]) for e in batch}) == BATCH
        for e in batch:
            c = int(e["case_index"])
            i, j = (int(x) for x in e["pair"])
            firsts[(c, i)] += 1
            assert (i != j) == (store.counts[c] >= 2) == bool(e["distinct"])
    # One epoch: no image twice as the anchor, and nearly all of them (patient-unique packing
    # may defer a few to the next epoch).
    assert max(firsts.values()) == 1
    assert len(firsts) >= 0.9 * store.num_images


def test_sampler_options_need_multi_instance_and_valid_values():
    config = tiny_pretrain_config("simclr")
    config.sampler.distinct_prob = 0.5
    with pytest.raises(config_lib.ConfigError, match="sampler.distinct_prob"):
        config_lib.validate(config)
    config = tiny_pretrain_config("micle")
    config.sampler.epoch_over = "patients"
    with pytest.raises(config_lib.ConfigError, match="sampler.epoch_over"):
        config_lib.validate(config)
    config.sampler.epoch_over = "images"
    config.sampler.distinct_prob = 1.5
    with pytest.raises(config_lib.ConfigError, match="sampler.distinct_prob"):
        config_lib.validate(config)
