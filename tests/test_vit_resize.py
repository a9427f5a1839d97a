"""`interpolate_pos_embed` against DINO's PyTorch position-embedding resize.

The fixture holds DINO's `interpolate_pos_encoding` (bicubic F.interpolate with
scale_factor (n + 0.1) / g) run by torch on random embeddings; regenerate it with
tests/fixtures/make_pos_embed_fixture.py (torch is not needed to run these tests).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medssl_jax.models.vit import interpolate_pos_embed

FIXTURE = Path(__file__).parent / "fixtures" / "pos_embed_resize.npz"


def _cases() -> dict[str, tuple[np.ndarray, np.ndarray, tuple[int, int]]]:
    with np.load(FIXTURE) as f:
        return {
            str(n): (f[f"{n}_in"], f[f"{n}_out"], tuple(int(v) for v in f[f"{n}_grid"]))
            for n in f["names"]
        }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_dino_torch_resize(name: str):
    pos, want, grid_hw = CASES[name]
    got = np.asarray(interpolate_pos_embed(jnp.asarray(pos), grid_hw))
    assert got.shape == want.shape == (1, 1 + grid_hw[0] * grid_hw[1], pos.shape[-1])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_fixture_covers_the_intended_cases():
    grids = {name: c[2] for name, c in CASES.items()}
    assert grids["g14_224x224"] == (14, 14)  # identity case
    assert {(3, 3), (6, 6), (5, 7), (30, 30), (14, 10)} <= set(grids.values())


def test_identity_when_grid_matches():
    pos, want, _ = CASES["g14_224x224"]
    np.testing.assert_array_equal(want, pos)  # DINO returns the stored embedding
    pos = jnp.asarray(pos)
    assert interpolate_pos_embed(pos, (14, 14)) is pos
    tiny = jnp.asarray(CASES["g4_48x48"][0])
    assert interpolate_pos_embed(tiny, (4, 4)) is tiny


def test_under_jit():
    for name in ("g14_224x160", "g4_80x112", "g14_224x224"):
        pos, want, grid_hw = CASES[name]
        fn = jax.jit(interpolate_pos_embed, static_argnums=1)
        got = np.asarray(fn(jnp.asarray(pos), grid_hw))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_non_square_orientation():
    # Rows follow the height and columns the width: a transposed resize would not match.
    pos, want, (gh, gw) = CASES["g4_80x112"]
    got = np.asarray(interpolate_pos_embed(jnp.asarray(pos), (gw, gh)))
    assert got.shape[1] == want.shape[1] and not np.allclose(got, want, atol=1e-3)
