"""`tf.distribute` strategies by name, and replica helpers that are no-ops with one replica.

`strategy_from_name` is the strategy factory (as tensorflow/models'
`official/common/distribute_utils.py`); only `cgc_tf.training` calls it. The model
calls the replica helpers from replica code; it never creates or stores a strategy.
See docs/distributed.md for launch recipes (one GPU, all GPUs, several machines
with TF_CONFIG or SLURM, TPU).
"""

import os
import shutil

import tensorflow as tf

STRATEGY_NAMES = ("default", "one_device", "mirrored", "multi_worker", "tpu")
# /proc/cpuinfo flags of CPUs that compute bfloat16 natively (dot products in
# AVX-512 BF16, matrix tiles in AMX); without them oneDNN emulates bfloat16,
# which is slower than float32.
NATIVE_BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")

# The learning rate of the paper's setting is defined for this global batch
# (SGD lr 0.1 at batch 256, docs/method.md).
REFERENCE_BATCH_SIZE = 256

# Environment variables that `srun` sets for every task of a job step; the
# SlurmClusterResolver needs all of them (`sbatch` alone does not set the STEP ones).
_SLURM_STEP_VARIABLES = (
    "SLURM_PROCID",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_STEP_NODELIST",
    "SLURM_STEP_TASKS_PER_NODE",
)


def strategy_from_name(name, tpu=None, cluster_resolver=None):
    """Builds a `tf.distribute.Strategy` from its name.

    Args:
      name: one of STRATEGY_NAMES:
        "default": `tf.distribute.get_strategy()` (no distribution);
        "one_device": OneDeviceStrategy on the first GPU, else the CPU;
        "mirrored": MirroredStrategy over all local GPUs, or all logical CPU devices
          on a machine without GPUs;
        "multi_worker": MultiWorkerMirroredStrategy over the cluster given by
          `cluster_resolver`, else TF_CONFIG, else SLURM (when run by `srun`);
        "tpu": TPUStrategy; connects to and initialises the TPU system.
      tpu: TPU name or address for "tpu" ("local" on a Cloud TPU VM; None reads
        the TPU_NAME environment variable). Ignored by the other strategies.
      cluster_resolver: optional `tf.distribute.cluster_resolver.ClusterResolver`
        for "multi_worker" and "tpu".

    Returns:
      tf.distribute.Strategy.

    Raises:
      ValueError: if `name` is not in STRATEGY_NAMES.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([device.name for device in devices])
    if name == "multi_worker":
        # Must run before TensorFlow initialises its devices (before any op): the
        # strategy configures the collective ops of the eager context.
        resolver = cluster_resolver or cluster_resolver_from_environment()
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    if name == "tpu":
        resolver = cluster_resolver or tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"strategy={name!r} is not one of {STRATEGY_NAMES}")


def cpu_flags(cpuinfo_path="/proc/cpuinfo"):
    """The CPU feature flags of /proc/cpuinfo (lower case); empty where it is missing."""
    try:
        with open(cpuinfo_path) as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def resolve_mixed_precision(setting, strategy_name, cpuinfo_path="/proc/cpuinfo"):
    """The Keras dtype policy for a `mixed_precision` setting, and why.

    "auto" picks "mixed_bfloat16" where the devices compute bfloat16 natively:
    TPUs, GPUs of compute capability >= 8.0 (all visible GPUs), CPUs (when no
    GPU is visible) with AVX512_BF16 or AMX; "float32" elsewhere. "none" is
    "float32"; the other settings are returned as they are.

    Args:
      setting: "auto", "none", "mixed_float16" or "mixed_bfloat16".
      strategy_name: a name of STRATEGY_NAMES ("tpu" means TPUs).
      cpuinfo_path: where the CPU flags are read (tests pass their own file).

    Returns:
      (policy name str, reason str).
    """
    if setting != "auto":
        return ("float32" if setting == "none" else setting), f"mixed_precision={setting!r}"
    if strategy_name == "tpu":
        return "mixed_bfloat16", "auto: TPUs compute bfloat16 natively"
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capabilities = [
            tuple(tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0,))
            for gpu in gpus
        ]
        lowest = ".".join(str(part) for part in min(capabilities))
        if min(capabilities) >= (8, 0):
            return "mixed_bfloat16", f"auto: GPUs of compute capability {lowest} >= 8.0"
        return "float32", f"auto: GPU compute capability {lowest} < 8.0 (no native bfloat16)"
    native = sorted(set(NATIVE_BFLOAT16_CPU_FLAGS) & cpu_flags(cpuinfo_path))
    if native:
        return "mixed_bfloat16", f"auto: the CPU computes bfloat16 natively ({', '.join(native)})"
    return "float32", "auto: the CPU has neither AVX512_BF16 nor AMX (no native bfloat16)"


def cluster_resolver_from_environment():
    """The multi-worker cluster described by the environment.

    TF_CONFIG wins when set; otherwise a task started by SLURM's `srun` gets a
    `SlurmClusterResolver` (one worker per task, ports from 8888 on each node).

    Returns:
      A `tf.distribute.cluster_resolver.ClusterResolver`, or None when neither
      TF_CONFIG nor the SLURM step variables are set (MultiWorkerMirroredStrategy
      then runs as a single local worker).
    """
    if "TF_CONFIG" in os.environ:
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if all(variable in os.environ for variable in _SLURM_STEP_VARIABLES):
        return _slurm_cluster_resolver()
    return None


def _slurm_cluster_resolver():
    if "CUDA_VISIBLE_DEVICES" in os.environ or shutil.which("nvidia-smi"):
        # The resolver counts the GPUs itself and gives each task its share
        # through CUDA_VISIBLE_DEVICES.
        return tf.distribute.cluster_resolver.SlurmClusterResolver()
    # CPU-only nodes: the resolver would call nvidia-smi (and fail without it), and
    # with 0 GPUs per task its port assignment loop is empty. One nominal "GPU"
    # per task keeps the port assignment; auto_set_gpu=False leaves
    # CUDA_VISIBLE_DEVICES alone.
    tasks = int(os.environ["SLURM_STEP_NUM_TASKS"])
    return tf.distribute.cluster_resolver.SlurmClusterResolver(
        gpus_per_node=tasks, gpus_per_task=1, auto_set_gpu=False
    )


def is_chief(strategy=None):
    """True on the task that writes checkpoints, logs and the final model.

    That is the "chief" task, else worker 0 of a cluster without a chief, and
    always True for single-machine strategies (TF's `extended.should_checkpoint`).

    Args:
      strategy: a tf.distribute.Strategy; default the current one.

    Returns:
      bool.
    """
    strategy = strategy or tf.distribute.get_strategy()
    return bool(strategy.extended.should_checkpoint)


def scaled_learning_rate(
    base_learning_rate, global_batch_size, base_batch_size=REFERENCE_BATCH_SIZE
):
    """Linear scaling rule (Goyal et al. 2017): lr = base_lr * global_batch / base_batch.

    The paper trains with SGD lr 0.1 at a global batch of 256; the same recipe at
    a global batch of 64 uses 0.025.

    Args:
      base_learning_rate: float, the learning rate at `base_batch_size`.
      global_batch_size: int, examples per optimizer step summed over replicas.
      base_batch_size: int, the batch size `base_learning_rate` was tuned for.

    Returns:
      float.

    Raises:
      ValueError: if a batch size is not a positive int.
    """
    for argument, value in (
        ("global_batch_size", global_batch_size),
        ("base_batch_size", base_batch_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{argument}={value!r} must be a positive int")
    return float(base_learning_rate) * global_batch_size / base_batch_size


def num_replicas_in_sync():
    """Number of replicas the current replica context synchronises with (1 outside a strategy)."""
    context = tf.distribute.get_replica_context()
    if context is None:  # cross-replica context
        return tf.distribute.get_strategy().num_replicas_in_sync
    return context.num_replicas_in_sync


def scale_loss_for_replicas(loss):
    """Divides a per-replica mean loss by the replica count, once.

    Gradients are summed over replicas, so this makes one N-replica step on a
    global batch equal a single-device step on the same examples.

    Args:
      loss: float scalar tensor, the mean over this replica's examples.

    Returns:
      `loss / num_replicas_in_sync()`, same dtype (`loss` itself with one replica).
    """
    replicas = num_replicas_in_sync()
    if replicas == 1:
        return loss
    return loss / tf.cast(replicas, loss.dtype)


def all_gather_with_offset(values):
    """Gathers `values` [B, ...] of all replicas along axis 0 (differentiable).

    The gradient of `ReplicaContext.all_gather` sums the upstream gradients of
    all replicas and hands each replica the slice of its own values, so a loss
    that uses other replicas' values as negatives gets the same gradient as on
    one device (tests/distribute_test.py checks this against the full batch).

    Args:
      values: tensor [B, ...], this replica's values (B equal on all replicas).

    Returns:
      (gathered [N*B, ...] in replica order, offset int32 scalar: the row of this
      replica's first value). With one replica: (values, 0).
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return values, 0
    gathered = context.all_gather(values, axis=0)
    replica_id = tf.cast(context.replica_id_in_sync_group, tf.int32)
    return gathered, replica_id * tf.shape(values)[0]
