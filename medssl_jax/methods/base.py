"""What a pretraining method declares, and the registry the generic step and loop dispatch on.

A method is one file in this package: a `Method` subclass that declares its config section and
validation, its views (global and local crops), and `build`, which returns the `Parts` the
generic step in `pretrain.py` runs: the network (backbone + the method's heads), its extra
state (teacher, centre, queue), and a pure loss. Multi-instance pairing (MICLe) is not a
method: it is `config.sampler.multi_instance`, available to every method.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from medssl_jax import losses
from medssl_jax.state import Frozen

# loss(params, batch_stats, extra, batch, rng, step) -> (loss, (metrics, batch_stats, extra))
LossFn = Callable[..., tuple[jax.Array, tuple[dict, Any, Any]]]


@dataclasses.dataclass(frozen=True)
class Crops:
    """`count` crops of `size` px whose area is a fraction in `area_range` of the image."""

    count: int
    size: int
    area_range: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class Views:
    """Per example: 2 global crops ('views' [B, 2, S, S, 3]) and optional local crops
    ('local_views' [B, N, s, s, 3]). With multi-instance pairing the two global crops come from
    two distinct images of the case and local crop k from the first (k even) or second image."""

    global_crops: Crops
    local_crops: Crops | None = None

    @property
    def num_local(self) -> int:
        return 0 if self.local_crops is None else self.local_crops.count

    @property
    def images_per_example(self) -> int:
        return self.global_crops.count + self.num_local


@dataclasses.dataclass
class Parts:
    """What the generic pretraining step needs from a method.

    model: the student network (a SimCLRModel with the method's head).
    init_extra(params, batch_stats) -> extra: the method's state at step 0.
    init_params(params) -> params: e.g. normalised prototypes at step 0.
    loss: pure (params, batch_stats, extra, batch, rng, step) -> (loss, (metrics,
      batch_stats, extra)); `extra` out is the state after this step's statistics
      (queue, centre, teacher BatchNorm statistics), before any parameter-dependent update.
    frozen: parameters held still early on (SwAV's prototypes, DINO's last layer); the step
      zeroes their gradients and updates and keeps their optimiser state (state.Frozen).
    post_update(params, extra, step) -> (params, extra): after the optimiser (EMA teacher,
      prototype re-normalisation). `step` is the step just taken (0-based).
    check_collapse(metrics) -> warning or None, on the logged (window-averaged) metrics.
    """

    model: Any
    loss: LossFn
    init_extra: Callable[[Any, Any], Any] = lambda params, batch_stats: {}
    init_params: Callable[[Any], Any] = lambda params: params
    frozen: Frozen = Frozen()
    post_update: Callable[[Any, Any, jax.Array], tuple[Any, Any]] = lambda p, e, s: (p, e)
    check_collapse: Callable[[dict], str | None] = lambda metrics: None


class Method(abc.ABC):
    """Base class: subclasses set `name` and implement `views` and `build` (and, when they
    have one, `defaults` and `validate`)."""

    name: str = ""

    def defaults(self) -> ml_collections.ConfigDict | None:
        """The method's config section (`config.<name>`), or None if it has none."""
        return None

    def validate(self, config: ml_collections.ConfigDict, require: Callable) -> None:
        """Checks the method's fields; `require(cond, field, msg)` raises ConfigError.
        The default checks nothing: a method without fields of its own needs no override."""
        return None

    @abc.abstractmethod
    def views(self, config: ml_collections.ConfigDict) -> Views:
        """The crops each example contributes."""

    @abc.abstractmethod
    def build(
        self,
        config: ml_collections.ConfigDict,
        *,
        num_classes: int,
        label_kind: str,
        total_steps: int,
        steps_per_epoch: float,
    ) -> Parts:
        """The network, state and loss for `config` (see `Parts`)."""


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Adds `method` to the registry under `method.name` (each method module calls this)."""
    if not method.name or method.name in _REGISTRY:
        raise ValueError(f"method name {method.name!r} is empty or already registered")
    _REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"unknown pretraining method {name!r}; registered: {names()}")
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


# ----------------------------------------------------------------------------- shared helpers


def crops_from_config(config: ml_collections.ConfigDict) -> Views:
    """Global crops at data.image_size with crops.global_area, plus crops.num_local local ones."""
    c = config.crops
    g = Crops(2, int(config.data.image_size), tuple(float(x) for x in c.global_area))
    n = int(c.get("num_local", 0))
    local = Crops(n, int(c.local_size), tuple(float(x) for x in c.local_area)) if n > 0 else None
    return Views(g, local)


def validate_crops(config: ml_collections.ConfigDict, require: Callable) -> None:
    c = config.get("crops")
    require(c is not None, "crops", "missing (global_area, num_local, local_size, local_area)")
    for field in ("global_area", "local_area"):
        lo, hi = (float(x) for x in c[field])
        require(0.0 < lo <= hi <= 1.0, f"crops.{field}", f"need 0 < lo <= hi <= 1, got {c[field]}")
    require(int(c.num_local) >= 0, "crops.num_local", f"must be >= 0, got {c.num_local}")
    if int(c.num_local) > 0:
        require(int(c.local_size) >= 16, "crops.local_size", f"must be >= 16, got {c.local_size}")


def apply_model(model: Any, params: Any, batch_stats: Any, x: jax.Array) -> tuple[dict, Any]:
    """Training-mode forward; returns (outputs, new batch_stats)."""
    out, mutated = model.apply(
        {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    return out, mutated.get("batch_stats", batch_stats)


def flatten_views(views: jax.Array) -> jax.Array:
    """[B, V, S, S, 3] -> [B*V, S, S, 3], example-major: each device keeps its own rows."""
    return views.reshape((-1,) + views.shape[2:])


def supervised_terms(
    logits: jax.Array, batch: dict, label_kind: str, repeats: int
) -> tuple[jax.Array, dict]:
    """Masked supervised loss of `logits` [B*repeats, K] (rows example-major) on the batch
    labels; unlabelled rows (label -1 / mask 0) contribute nothing."""
    metrics = {}
    if label_kind == "multilabel":
        loss = losses.masked_sigmoid_ce(
            logits,
            jnp.repeat(batch["label"], repeats, axis=0),
            jnp.repeat(batch["label_mask"], repeats, axis=0),
        )
    else:
        loss, metrics["probe_acc"] = losses.masked_softmax_ce(
            logits, jnp.repeat(batch["label"], repeats)
        )
    return loss, metrics


def embedding_spread(z: jax.Array) -> jax.Array:
    """sqrt(D) x the mean over dimensions of the batch std of L2-normalised embeddings [N, D].

    About 1 for embeddings spread over the sphere, 0 when every input maps to one point.
    """
    zn = losses.l2_normalize(z.astype(jnp.float32))
    return jnp.mean(jnp.std(zn, axis=0)) * jnp.sqrt(jnp.float32(z.shape[-1]))


def mean_assignment_entropy(p: jax.Array) -> jax.Array:
    """Entropy of the batch-mean assignment distribution of p [N, K]: ln K when every
    prototype/dimension is used equally, 0 when all mass sits on one (collapse)."""
    m = jnp.mean(p.astype(jnp.float32), axis=0)
    return -jnp.sum(jnp.where(m > 0, m * jnp.log(jnp.maximum(m, 1e-30)), 0.0))


def mean_sample_entropy(p: jax.Array) -> jax.Array:
    """Mean over rows of the entropy of each row of p [N, K]: ln K when every output is
    uniform (the collapse in which SwAV's loss sticks at ln K, or DINO's teacher flattens)."""
    p = p.astype(jnp.float32)
    return -jnp.mean(jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1))


def collapse_warning(metrics: dict, *, num_outputs: int) -> str | None:
    """A warning on the usual signatures of collapse: every input assigned to one output
    (assign_entropy < 10% of ln K), every output uniform (sample_entropy > 98% of ln K, checked
    from the second epoch on, since a fresh network's outputs are near uniform), or every
    embedding at one point (embed_spread < 0.1)."""
    import math

    msgs = []
    ln_k = math.log(num_outputs) if num_outputs > 1 else 0.0
    ent = metrics.get("assign_entropy")
    if ent is not None and ln_k and ent < 0.1 * ln_k:
        msgs.append(f"assign_entropy {ent:.3g} < 10% of ln K = {ln_k:.3g} (one output wins)")
    flat = metrics.get("sample_entropy")
    if flat is not None and ln_k and flat > 0.98 * ln_k and metrics.get("epoch", 0.0) >= 1.0:
        msgs.append(f"sample_entropy {flat:.4g} ~ ln K = {ln_k:.4g} (uniform outputs)")
    spread = metrics.get("embed_spread")
    if spread is not None and spread < 0.1:
        msgs.append(f"embed_spread {spread:.3g} < 0.1 (embeddings collapse to a point)")
    return "; ".join(msgs) or None
