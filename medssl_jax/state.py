"""The train state every stage shares, and the jit/sharding wiring of a train step.

`TrainState.extra` holds what a method keeps besides parameters, BatchNorm statistics and the
optimiser: DINO's EMA teacher and centre, SwAV's queue. It is a pytree like the rest, so it is
sharded, donated, checkpointed and restored with no method-specific code.

Placement (`state_shardings`): replicated on every device (data parallelism), or with FSDP the
parameters, optimiser state and `extra` split over the 'data' axis array by array
(`sharding.fsdp_sharding`), BatchNorm statistics and the step replicated. The jitted step takes
and returns the state in that placement, so XLA gathers the parameters where the forward pass
needs them and reduce-scatters the gradients; the arithmetic is that of data parallelism.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from medssl_jax import optim, sharding


@dataclasses.dataclass(frozen=True)
class Frozen:
    """Parameters held still for the first `steps` steps (SwAV's prototypes, DINO's last
    layer): each is named by the key-path suffix of its leaf, e.g. ("method_head", "kernel"),
    which also matches its leaves in the optimiser state (momentum, Adam's moments)."""

    paths: tuple[tuple[str, ...], ...] = ()
    steps: int = 0

    def matches(self, path: tuple[Any, ...]) -> bool:
        names = tuple(optim.path_names(path))
        return any(names[len(names) - len(p) :] == p for p in self.paths)

    def where(self, on: jax.Array, tree: Any, held: Any) -> Any:
        """`tree` with its frozen leaves taken from `held` (same structure) while `on`."""
        return jax.tree_util.tree_map_with_path(
            lambda path, x, h: jnp.where(on, h, x) if self.matches(path) else x, tree, held
        )


@flax.struct.dataclass
class TrainState:
    """Everything a step updates; a plain pytree (checkpointed as is)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    extra: Any = dataclasses.field(default_factory=dict)

    def apply_gradients(
        self, tx: Any, grads: Any, batch_stats: Any, frozen: Frozen | None = None
    ) -> TrainState:
        """One optimiser update, new BatchNorm statistics, step + 1. Leaves `frozen` at this step
        get a zero gradient, no update (not even weight decay) and keep their optimiser state
        (moments, momentum), as PyTorch skips a parameter whose grad is None."""
        hold = frozen is not None and frozen.steps > 0
        if hold:
            on = self.step < frozen.steps
            grads = frozen.where(on, grads, jax.tree.map(jnp.zeros_like, grads))
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        if hold:
            updates = frozen.where(on, updates, jax.tree.map(jnp.zeros_like, updates))
            opt_state = frozen.where(on, opt_state, self.opt_state)
        return self.replace(
            step=self.step + 1,
            params=optax.apply_updates(self.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )


@dataclasses.dataclass
class Built:
    """A compiled-on-demand train step and what it needs, independent of data and devices."""

    model: Any
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    step: Callable  # jitted (state, batch) -> (state, metrics), state donated
    init: Callable  # jitted rng -> TrainState (replicated)
    abstract_state: Any  # TrainState of ShapeDtypeStructs with shardings
    abstract_batch: dict[str, jax.ShapeDtypeStruct]
    method: Any = None  # pretraining: the methods.base.Parts the step was built from
    state_sharding: Any = None  # TrainState of NamedShardings (the state's placement)


def label_structs(
    batch_size: int, num_classes: int, label_kind: str, data_sharding: Any
) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract 'label' (and 'label_mask') of a global batch, as the input pipeline emits them."""
    if label_kind == "multilabel":
        shape, dtype, keys = (batch_size, num_classes), jnp.float32, ("label", "label_mask")
    else:
        shape, dtype, keys = (batch_size,), jnp.int32, ("label",)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=data_sharding) for k in keys}


def skip_nonfinite(
    step: Callable[[TrainState, dict], tuple[TrainState, dict]],
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`step`, except that an update giving a non-finite loss or state is dropped: parameters,
    statistics, optimiser and method state stay as they were, the step counter advances (so
    the batches stay a function of the step) and metrics['skipped'] is 1 (nan_policy='skip')."""

    def guarded(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        new, metrics = step(state, batch)
        floats = [
            x
            for x in jax.tree.leaves((new, metrics["loss"]))
            if jnp.issubdtype(x.dtype, jnp.inexact)
        ]
        ok = jnp.all(jnp.stack([jnp.isfinite(x).all() for x in floats]))
        kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
        return kept.replace(step=new.step), {**metrics, "skipped": 1.0 - ok.astype(jnp.float32)}

    return guarded


def state_shardings(
    state: TrainState,
    mesh: jax.sharding.Mesh,
    *,
    fsdp: bool = False,
    fsdp_min_size: int = sharding.FSDP_MIN_SIZE,
) -> TrainState:
    """A NamedSharding per leaf of `state` (arrays or ShapeDtypeStructs): all replicated, or
    with `fsdp` params / opt_state / extra split over 'data' (see `sharding.fsdp_sharding`).
    The rule depends on shapes only, so a parameter, its optimiser moments and its EMA copy
    are split alike."""
    repl = sharding.replicated(mesh)
    everywhere = jax.tree.map(lambda _: repl, state)
    if not fsdp:
        return everywhere

    def split(tree: Any) -> Any:
        return jax.tree.map(lambda x: sharding.fsdp_sharding(x.shape, mesh, fsdp_min_size), tree)

    return everywhere.replace(
        params=split(state.params), opt_state=split(state.opt_state), extra=split(state.extra)
    )


def compile_train(
    model: Any,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    step: Callable[[TrainState, dict], tuple[TrainState, dict]],
    mesh: jax.sharding.Mesh,
    *,
    init: Callable[[jax.Array], TrainState],
    abstract_batch: dict[str, jax.ShapeDtypeStruct],
    method: Any = None,
    nan_policy: str = "stop",
    fsdp: bool = False,
    fsdp_min_size: int = sharding.FSDP_MIN_SIZE,
) -> Built:
    """Jits `step` over `mesh` (state donated and placed by `state_shardings`: replicated, or
    split over 'data' with `fsdp`; batch sharded on 'data') and the state initialiser, which
    creates the state in that placement; the abstract state allows lowering without
    allocating anything. nan_policy 'skip' wraps the step in `skip_nonfinite`; 'stop' leaves
    it to the loop."""
    repl = sharding.replicated(mesh)
    shapes = jax.eval_shape(init, jax.random.key(0))
    state_sh = state_shardings(shapes, mesh, fsdp=fsdp, fsdp_min_size=fsdp_min_size)
    if nan_policy == "skip":
        step = skip_nonfinite(step)
    return Built(
        model=model,
        tx=tx,
        lr_schedule=lr_schedule,
        step=jax.jit(
            step,
            in_shardings=(state_sh, sharding.batch_sharded(mesh)),
            out_shardings=(state_sh, repl),
            donate_argnums=(0,),
        ),
        init=jax.jit(init, out_shardings=state_sh),
        abstract_state=sharding.abstract_with(shapes, state_sh),
        abstract_batch=abstract_batch,
        method=method,
        state_sharding=state_sh,
    )


def init_variables(model: Any, rng: jax.Array, image_size: int) -> tuple[Any, Any]:
    """(params, batch_stats) of `model` for [2, S, S, 3] inputs."""
    x = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
    variables = model.init(rng, x, train=False)
    return variables["params"], variables.get("batch_stats", {})


def make_init(model: Any, tx: Any, image_size: int) -> Callable[[jax.Array], TrainState]:
    """rng -> fresh TrainState (step 0, initial params/batch_stats, optimiser state)."""

    def init(rng: jax.Array) -> TrainState:
        params, batch_stats = init_variables(model, rng, image_size)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=tx.init(params),
        )

    return init
