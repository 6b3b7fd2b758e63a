"""Device meshes and the one rules table that places params, optimizer state, batches and caches.

The model names logical axes only (`batch, length, embed, heads, kv_heads, head_dim, mlp, vocab,
layers`); `RULES` maps them onto the mesh axes `data`, `fsdp` and `tensor`:

- batch rows split over `data` × `fsdp` (data parallel; FSDP shards the rows too),
- params' `embed` dimension split over `fsdp` (ZeRO-3-style: each device holds a slice and XLA
  gathers it for the matmul, as in MaxText and EasyDeL),
- attention heads, KV heads, MLP width and vocab split over `tensor` (Megatron-style).

A mesh axis is used at most once per array, first rule first (Flax's resolution), so activations
[batch, length, embed] shard their rows over data × fsdp and keep `embed` whole.

Every array of a train state is placed by the logical axes of the param it belongs to (the
optimizer's moments mirror their params); scalars and unnamed leaves are replicated. Steps are
jitted with these shardings declared and the state donated, and the model's own logical
constraints become sharding constraints while they trace (`mesh_context`).

Multi-host: `initialize_distributed` starts `jax.distributed` from the config or the environment;
every process builds the same host batch from the seed and hands JAX only its own shards
(`place_batch`), so the global batch never has to live on one host's devices.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxrl_llm.errors import ShardingError
from jaxrl_llm.models.transformer import QUANTIZED_NAMES, ModelConfig, init_params, param_logical_axes
from jaxrl_llm.state import frozen_parts, with_frozen, without_frozen

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("length", None),
    ("head_dim", None),
    ("lora_rank", None),
)


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with a -1 resolved to the remaining devices; errors if they don't fit."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    known = math.prod(size for size in sizes.values() if size != -1)
    free = [name for name, size in sizes.items() if size == -1]
    if free:
        if num_devices % known:
            raise ShardingError(
                f"mesh {sizes}: the fixed axes use {known} devices, which does not divide the "
                f"{num_devices} available; choose sizes whose product divides {num_devices}."
            )
        sizes[free[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ShardingError(
            f"mesh data={sizes['data']} × fsdp={sizes['fsdp']} × tensor={sizes['tensor']} = "
            f"{math.prod(sizes.values())} devices, but {num_devices} are available; make the product "
            f"{num_devices} or set one axis to -1 (the remaining devices)."
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), with GSPMD's automatic axes."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def single_device_mesh() -> Mesh:
    """A 1×1×1 mesh on the default device: the unsharded case through the same code."""
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def batch_shards(mesh: Mesh) -> int:
    """How many ways batch rows are split: data × fsdp."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


@contextlib.contextmanager
def mesh_context(mesh: Mesh):
    """Trace under `mesh` with `RULES`, so the model's logical constraints shard activations
    (used inside `jax.jit`: the abstract mesh is all a trace needs)."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(RULES):
        yield


# ---------------------------------------------------------------- specs


def logical_spec(names: tuple, shape: tuple[int, ...], mesh: Mesh, where: str) -> PartitionSpec:
    """The PartitionSpec of an array with logical axis `names`; errors if a split does not divide."""
    spec = nn.logical_to_mesh_axes(names, RULES)
    for name, size, axes in zip(names, shape, spec):
        axes = (axes,) if isinstance(axes, str) else axes or ()
        ways = math.prod(mesh.shape[a] for a in axes)
        if size % ways:
            fields = " × ".join(f"mesh.{a}" for a in axes)
            raise ShardingError(
                f"{where} has shape {tuple(shape)}: its {name!r} dimension of size {size} cannot be "
                f"split {ways} ways over {fields}; choose {fields} dividing {size}."
            )
    return spec


def _path_names(path) -> tuple[str, ...]:
    """The dict keys along a pytree path (attribute and index steps dropped)."""
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _axes_table(model_configs) -> dict[tuple[str, ...], tuple]:
    """{param path: logical axes} for the LM and scalar-head params of each model config."""
    table = {}
    for config in model_configs:
        for scalar_head in (False, True):
            axes = param_logical_axes(config, scalar_head)
            leaves = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
            table.update({_path_names(path): tuple(spec) for path, spec in leaves})
    return table


def _match(names: tuple[str, ...], rank: int, table: dict) -> tuple | None:
    """Logical axes of the longest param path that `names` ends with (and whose rank fits)."""
    for start in range(len(names)):
        axes = table.get(names[start:])
        if axes is not None and len(axes) == rank:
            return axes
    return None


def tree_specs(tree: Any, mesh, model_configs) -> Any:
    """PartitionSpecs for a params or train-state pytree on `mesh` (a Mesh or AbstractMesh): every
    leaf that is (or mirrors, like Adam's moments) a model param gets that param's layout;
    everything else is replicated."""
    table = _axes_table(model_configs)

    def spec(path, leaf):
        shape = np.shape(leaf)
        names = _path_names(path)
        if names and names[-1] in QUANTIZED_NAMES:  # a quantised kernel's codes and scales keep its rank and axes
            names = (*names[:-1], "kernel")
        axes = _match(names, len(shape), table)
        if axes is None:
            return PartitionSpec()
        return logical_spec(axes, shape, mesh, "param " + "/".join(_path_names(path)))

    return jax.tree_util.tree_map_with_path(spec, tree)


def tree_shardings(tree: Any, mesh: Mesh, model_configs) -> Any:
    """NamedShardings laid out by `tree_specs`."""
    specs = tree_specs(tree, mesh, model_configs)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def param_specs(config: ModelConfig, mesh, scalar_head: bool = False) -> dict:
    """PartitionSpec of every param of `config` on `mesh` (the golden table's content)."""
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0), scalar_head))
    return tree_specs(abstract, mesh, [config])


def param_placer(config: ModelConfig, mesh: Mesh, scalar_head: bool = False) -> Callable:
    """`place(path, host_array)`: one param of `config` uploaded straight into its layout."""
    specs = param_specs(config, mesh, scalar_head)

    def place_one(path: tuple[str, ...], value) -> jax.Array:
        spec = functools.reduce(lambda node, name: node[name], path, specs)
        return put(value, NamedSharding(mesh, spec))

    return place_one


def placement(mesh: Mesh | None) -> Callable | None:
    """`placement(config, scalar_head)` for `models.load.load_model`: each loaded tensor straight into
    its layout on `mesh` (None: the default device)."""
    if mesh is None:
        return None
    return lambda config, scalar_head: param_placer(config, mesh, scalar_head)


def init_sharded(config: ModelConfig, key: jax.Array, mesh: Mesh, scalar_head: bool = False) -> dict:
    """Random params computed directly in their sharded layout (never whole on one device)."""
    return _sharded_init(config, mesh, scalar_head)(key)


@functools.lru_cache(maxsize=16)
def _sharded_init(config: ModelConfig, mesh: Mesh, scalar_head: bool) -> Callable:
    """The jitted initialiser of one (config, mesh), compiled once per process."""
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0), scalar_head))
    shardings = tree_shardings(abstract, mesh, [config])
    return jax.jit(lambda key: init_params(config, key, scalar_head), out_shardings=shardings)


def batch_sharding(leaf, mesh: Mesh) -> NamedSharding:
    """Rows over data × fsdp when they divide evenly; otherwise (or for scalars) replicated."""
    shape = np.shape(leaf)
    if shape and shape[0] % batch_shards(mesh) == 0:
        return NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    return NamedSharding(mesh, PartitionSpec())


# ---------------------------------------------------------------- placement


def put(host_array, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds in full; each process uploads only
    the shards its own devices own."""
    host_array = np.asarray(host_array)
    return jax.make_array_from_callback(host_array.shape, sharding, lambda index: host_array[index])


def place(tree: Any, shardings: Any) -> Any:
    """`tree` laid out as `shardings` (a matching pytree): arrays already on device are resharded
    by JAX (across processes too), host arrays are uploaded shard by shard."""
    def one(leaf, sharding):
        return jax.device_put(leaf, sharding) if isinstance(leaf, jax.Array) else put(leaf, sharding)

    return jax.tree.map(one, tree, shardings)


def place_batch(batch: Any, mesh: Mesh) -> Any:
    """A batch with its rows split over data × fsdp."""
    return place(batch, jax.tree.map(lambda leaf: batch_sharding(leaf, mesh), batch))


def to_host(tree: Any) -> Any:
    """NumPy copies of (possibly multi-host) global arrays, the whole array on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def jit_step(step: Callable, mesh: Mesh, state_shardings: Any) -> Callable:
    """`step(state, batch, key) -> (state, metrics)` jitted on `mesh`: the state keeps its layout
    and is donated, batch rows are split over data × fsdp, metrics and the key are replicated.
    A LoRA state's frozen bases go in as a separate argument, neither donated nor returned, so
    several parts of the state may share one base (PPO's actor and critic trunk)."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def traced(trained, frozen, batch, key):
        with mesh_context(mesh):
            new_state, metrics = step(with_frozen(trained, frozen), batch, key)
        return without_frozen(new_state), metrics

    trained_shardings = without_frozen(state_shardings)
    # The batch's layout is whatever `place_batch` gave it (None: taken from the argument).
    jitted = jax.jit(
        traced, in_shardings=(trained_shardings, frozen_parts(state_shardings), None, replicated),
        out_shardings=(trained_shardings, replicated), donate_argnums=0,
    )

    def run(state, batch, key):
        frozen = frozen_parts(state)
        new_state, metrics = jitted(without_frozen(state), frozen, place_batch(batch, mesh), key)
        return with_frozen(new_state, frozen), metrics

    return run


# ---------------------------------------------------------------- multi-host


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> bool:
    """Start `jax.distributed` when configured or launched by a cluster; False when single-process.

    With all three arguments None JAX's own auto-detection runs only where a cluster launcher set
    its environment (SLURM, Open MPI, TPU pods, or JAX_COORDINATOR_ADDRESS).
    """
    if jax.distributed.is_initialized():
        return True
    explicit = coordinator_address is not None
    launched = any(name in os.environ for name in (
        "JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
    ))
    if not (explicit or launched):
        return False
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
