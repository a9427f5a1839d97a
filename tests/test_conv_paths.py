"""The convolution paths of the ResNets (models/resnet.py): TF SimCLR's fixed padding, im2col
for maps smaller than the kernel, and 1x1 convolutions as 2-D dots on CPU, each against lax's
convolution in values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_models import _Conv, _images, _key


def _assert_same_vjp(mine, ref, x, k, seed):
    """Input and kernel gradients of `mine` equal `ref`'s for one random cotangent."""
    g = np.random.default_rng(seed).random(ref(x, k).shape, dtype=np.float32)
    for argnum in (0, 1):
        got = jax.vjp(mine, x, k)[1](g)[argnum]
        want = jax.vjp(ref, x, k)[1](g)[argnum]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_strided_conv_uses_fixed_padding():
    x = _images(7, n=2, size=8)
    conv = _Conv(strides=2)
    variables = conv.init(_key(0), x)
    k = variables["params"]["c"]["kernel"]
    dn = ("NHWC", "HWIO", "NHWC")
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ref = jax.lax.conv_general_dilated(padded, k, (2, 2), "VALID", dimension_numbers=dn)
    out = conv.apply(variables, x)
    assert out.shape == (2, 4, 4, 4)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    same = jax.lax.conv_general_dilated(x, k, (2, 2), "SAME", dimension_numbers=dn)
    assert not np.allclose(out, same, atol=1e-3)  # XLA SAME would pad (0, 1) here
    # Stride 1 is plain SAME.
    conv1 = _Conv(strides=1)
    out1 = conv1.apply(variables, x)
    ref1 = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dn)
    np.testing.assert_allclose(out1, ref1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size,stride", [(2, 1), (1, 1), (4, 2), (3, 2)])
def test_tiny_maps_use_im2col_with_same_results(size, stride):
    """Outputs smaller than the kernel go through im2col_conv (XLA:CPU slow-path workaround):
    values and kernel/input gradients must equal the lax fixed-padding reference."""
    x = _images(13, n=2, size=size)
    conv = _Conv(strides=stride)
    variables = conv.init(_key(0), x)
    k = variables["params"]["c"]["kernel"]
    dn = ("NHWC", "HWIO", "NHWC")

    def ref(x, k):
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return jax.lax.conv_general_dilated(xp, k, (stride,) * 2, "VALID", dimension_numbers=dn)

    def mine(x, k):
        return conv.apply({"params": {"c": {"kernel": k}}}, x)

    hlo = jax.jit(mine).lower(x, k).as_text()
    assert "convolution" not in hlo and "dot_general" in hlo  # really the im2col path
    np.testing.assert_allclose(mine(x, k), ref(x, k), rtol=1e-5, atol=1e-6)
    _assert_same_vjp(mine, ref, x, k, seed=1)


@pytest.mark.parametrize("mode", ["dot", "conv"])
@pytest.mark.parametrize("size,stride", [(8, 1), (7, 2), (8, 2)])
def test_1x1_convs_as_dot_equal_the_lax_conv(monkeypatch, mode, size, stride):
    """MEDSSL_CONV1X1=dot (the CPU default) runs 1x1 convs as a dot: same values and
    gradients as lax's 1x1 conv (SAME == VALID; stride 2 keeps rows/cols 0, 2, ...); =conv
    keeps XLA's convolution."""
    monkeypatch.setenv("MEDSSL_CONV1X1", mode)
    x = _images(14, n=2, size=size)
    conv = _Conv(strides=stride, kernel=1, features=5)
    variables = conv.init(_key(0), x)
    k = variables["params"]["c"]["kernel"]
    assert k.shape == (1, 1, 3, 5)
    dn = ("NHWC", "HWIO", "NHWC")

    def ref(x, k):
        return jax.lax.conv_general_dilated(x, k, (stride,) * 2, "VALID", dimension_numbers=dn)

    def mine(x, k):
        return conv.apply({"params": {"c": {"kernel": k}}}, x)

    hlo = jax.jit(mine).lower(x, k).as_text()
    assert ("convolution" in hlo) == (mode == "conv")
    np.testing.assert_allclose(mine(x, k), ref(x, k), rtol=1e-5, atol=1e-6)
    _assert_same_vjp(mine, ref, x, k, seed=2)
    monkeypatch.setenv("MEDSSL_CONV1X1", "fast")
    with pytest.raises(ValueError, match="MEDSSL_CONV1X1"):
        conv.apply(variables, x)


def test_im2col_dots_are_2d_forward_and_backward(monkeypatch):
    """The dot path multiplies [B*H*W, K] rows (2-D), so its weight gradient contracts the rows
    of two 2-D arrays, which XLA:CPU does without first copying the gradient transposed (the
    4-D form cost the R50 step 1.2-1.3x in float32)."""
    monkeypatch.setenv("MEDSSL_CONV1X1", "dot")
    x = _images(15, n=2, size=8)
    conv = _Conv(strides=1, kernel=1, features=5)
    k = conv.init(_key(0), x)["params"]["c"]["kernel"]

    def loss(x, k):
        return jnp.sum(conv.apply({"params": {"c": {"kernel": k}}}, x) ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, k)
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 3  # forward, input gradient, weight gradient
    assert all(v.aval.ndim == 2 for e in dots for v in e.invars), [
        [v.aval.shape for v in e.invars] for e in dots
    ]


@pytest.mark.parametrize("padding", ["SAME", ((1, 1), (1, 1))])  # SimCLR's, torchvision's
@pytest.mark.parametrize("hw", [(9, 10), (8, 7)])  # odd and even sides
def test_max_pool_mask_gradient_equals_autodiff(monkeypatch, padding, hw):
    """The stem max-pool's mask gradient equals JAX's autodiff of nn.max_pool, ties included
    (ReLU zeros: the first maximum in row-major window order gets the gradient; a wrong
    choice moves a whole cotangent), and its backward holds no reduce-window."""
    import flax.linen as nn

    from medssl_jax.models import pooling

    monkeypatch.setenv("MEDSSL_MAXPOOL_GRAD", "mask")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, *hw, 5)).astype(np.float32)
    x = np.where(rng.random(x.shape) < 0.5, 0.0, x).astype(np.float32)  # many tied zeros
    x[0, :3, :3, 0] = 1.0  # a window whose maximum is tied 9 ways
    ref_fn = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=padding)  # noqa: E731
    mine_fn = lambda x: pooling.max_pool_3x3_s2(x, padding)  # noqa: E731
    ref_y, ref_vjp = jax.vjp(ref_fn, x)
    y, vjp = jax.vjp(mine_fn, x)
    np.testing.assert_array_equal(y, ref_y)
    g = rng.random(y.shape, dtype=np.float32) + 0.5
    # Up to float32 rounding: a position in up to 4 windows sums their cotangents in another
    # order.
    np.testing.assert_allclose(vjp(g)[0], ref_vjp(g)[0], rtol=1e-6, atol=1e-6)
    hlo = jax.jit(lambda x, g: jax.vjp(mine_fn, x)[1](g)).lower(x, g).as_text()
    assert hlo.count("reduce_window") == 1  # the forward's; the backward's are masks
    assert "select_and_scatter" not in hlo and "select_and_gather" not in hlo
