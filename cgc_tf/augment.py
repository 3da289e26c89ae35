"""Paired geometric transforms: one random T per example, for images and heatmaps.

`PairedAugmentation.sample()` draws T's per-example parameters (a dict of tensors);
`apply_to_images()` makes x_aug = T(x_orig), and `apply_to_heatmaps()` warps the
Grad-CAM heatmap of x_orig by the same T, differentiably (docs/method.md, steps 1
and 6). T = random resized crop + horizontal flip (kernels in `cgc_tf.resample`),
then optional keras-cv or Keras geometric layers. Images are [B, H, W, C], heatmaps
[B, H, W] or [B, H, W, C]. The only module that imports keras_cv (no longer released).
docs/augmentation.md explains the choices.
"""

import copy
import math
import numbers

import keras
import keras_cv
import tensorflow as tf

from cgc_tf import resample

# How T's crop is drawn and resampled (PairedAugmentation's `crop_mode`).
CROP_MODES = ("continuous", "torchvision")

# The geometric code has no tensor-dependent Python control flow. Skipping AutoGraph's
# source conversion (of this module and of the keras-cv methods it calls) cuts the
# tf.function tracing time of a PairedAugmentation with keras-cv layers by seconds.
_no_autograph = tf.autograph.experimental.do_not_convert


_KERAS_CV_GEOMETRIC_NAMES = (
    "RandomRotation",
    "RandomZoom",
    "RandomTranslation",
    "RandomShear",
    "RandomFlip",
    "RandomCrop",
    "RandomCropAndResize",
    "RandomAspectRatio",
    "JitteredResize",
    "Resizing",
)
_KERAS_GEOMETRIC_NAMES = (
    "RandomRotation",
    "RandomZoom",
    "RandomTranslation",
    "RandomShear",
    "RandomFlip",
    "RandomCrop",
    "RandomPerspective",
    "RandomElasticTransform",
    "Resizing",
)


def _classes(module, names):
    return tuple(getattr(module, name) for name in names if hasattr(module, name))


# Layers that move pixels: applying them to images only would break the pairing.
_GEOMETRIC_LAYER_CLASSES = _classes(
    keras_cv.layers, _KERAS_CV_GEOMETRIC_NAMES
) + _classes(keras.layers, _KERAS_GEOMETRIC_NAMES)


# Exact types: a subclass may change augment_images, so it takes the generic path.
_PROJECTIVE_MATRICES = {
    keras_cv.layers.RandomRotation: resample.rotation_matrices,
    keras_cv.layers.RandomZoom: resample.zoom_matrices,
    keras_cv.layers.RandomTranslation: resample.translation_matrices,
    keras_cv.layers.RandomShear: resample.shear_matrices,
    keras.layers.RandomRotation: resample.keras_rotation_matrices,
}
# Geometric layers whose own sampling and application compile under XLA. Other
# geometric layers warp with ImageProjectiveTransformV3, which has no XLA kernel.
_XLA_NATIVE_GEOMETRIC_TYPES = (keras_cv.layers.RandomFlip, keras.layers.RandomFlip)


def _is_xla_compatible(layer):
    return type(layer) in _PROJECTIVE_MATRICES or type(layer) in _XLA_NATIVE_GEOMETRIC_TYPES


def _global_batch_position(batch_size):
    """(replicas in sync, row of this replica's first example in the global batch).

    Under a tf.distribute strategy the global batch is the replicas' batches in
    replica order, as the strategy splits it; (1, 0) outside one.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return 1, 0
    replica_id = tf.cast(context.replica_id_in_sync_group, tf.int32)
    return context.num_replicas_in_sync, replica_id * tf.cast(batch_size, tf.int32)


def _replica_rows(transformation, first_row, batch_size, replicas):
    """This replica's rows of a geometric layer's global-batch transformation.

    The sampled tensors of rank >= 1 hold one row per example of the global
    batch and are sliced (unless their static first dimension says otherwise);
    scalars and Python values (Keras's image shapes) are kept, and a Keras
    `batch_size` entry becomes the replica's batch size.
    """
    if replicas == 1:
        return transformation
    static_batch = tf.get_static_value(batch_size)
    global_batch = None if static_batch is None else int(static_batch) * replicas

    def rows(value):
        if not (tf.is_tensor(value) and value.shape.rank):
            return value
        if global_batch is not None and value.shape[0] not in (None, global_batch):
            return value
        return value[first_row : first_row + batch_size]

    if isinstance(transformation, dict) and "batch_size" in transformation:
        transformation = dict(transformation, batch_size=batch_size)
    return tf.nest.map_structure(rows, transformation)


def _is_keras_cv_layer(layer):
    return isinstance(layer, keras_cv.layers.VectorizedBaseImageAugmentationLayer)


def _is_keras_image_layer(layer):
    return callable(getattr(layer, "get_random_transformation", None)) and callable(
        getattr(layer, "transform_images", None)
    )


def _describe(layer):
    return f"{type(layer).__name__} '{getattr(layer, 'name', '?')}'"


def _heatmap_variant(layer):
    """The layer with bilinear interpolation and a constant 0 fill, for heatmaps.

    keras-cv and Keras read `fill_mode`, `fill_value` and `interpolation` from the layer
    when they warp, and images usually use 'reflect' fill. A heatmap must not invent mass
    outside the original view, so we warp heatmaps with a shallow copy carrying the
    heatmap settings, leaving the user's layer untouched. object.__setattr__ bypasses
    Keras attribute tracking, which would otherwise track the copy's state.
    """
    settings = {"fill_mode": "constant", "fill_value": 0.0, "interpolation": "bilinear"}
    if all(getattr(layer, key, value) == value for key, value in settings.items()):
        return layer
    variant = copy.copy(layer)
    for key, value in settings.items():
        if hasattr(layer, key):
            object.__setattr__(variant, key, value)
    return variant


def _check_range(argument, value, allowed, lower_bound, upper_bound):
    message = f"`{argument}` must be {allowed}; received {value!r}."
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(message)
    if not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in value):
        raise ValueError(message)
    low, high = float(value[0]), float(value[1])
    if not (low > lower_bound and low <= high and high <= upper_bound):
        raise ValueError(message)
    return low, high


def _check_layers(argument, layers, geometric):
    if isinstance(layers, keras.layers.Layer) or not isinstance(layers, (tuple, list)):
        raise ValueError(
            f"`{argument}` must be a list or tuple of layers; received {layers!r}."
        )
    for index, layer in enumerate(layers):
        if not isinstance(layer, keras.layers.Layer):
            raise ValueError(
                f"`{argument}[{index}]` must be a keras or keras-cv layer; received "
                f"{layer!r} of type {type(layer).__name__}."
            )
        if geometric and not (_is_keras_cv_layer(layer) or _is_keras_image_layer(layer)):
            raise ValueError(
                f"`{argument}[{index}]` ({_describe(layer)}) cannot be applied with one "
                "shared transform to images and heatmaps. Allowed: keras-cv vectorized "
                "augmentation layers (get_random_transformation_batch/augment_images, "
                "e.g. keras_cv.layers.RandomRotation, RandomZoom, RandomTranslation, "
                "RandomShear, RandomFlip) or Keras image preprocessing layers "
                "(get_random_transformation/transform_images, e.g. "
                "keras.layers.RandomRotation)."
            )
        if geometric and getattr(layer, "data_format", "channels_last") != "channels_last":
            raise ValueError(
                f"`{argument}[{index}]` ({_describe(layer)}) has data_format="
                f"{layer.data_format!r}; images and heatmaps here are channels_last, so "
                "build the layer with data_format='channels_last'."
            )
        if not geometric and isinstance(layer, _GEOMETRIC_LAYER_CLASSES):
            raise ValueError(
                f"`{argument}[{index}]` ({_describe(layer)}) moves pixels; applied to "
                "images only it would break the image/heatmap pairing. Pass it in "
                "`geometric_layers` instead."
            )
    return list(layers)


@keras.saving.register_keras_serializable(package="cgc_tf")
class PairedAugmentation(keras.layers.Layer):
    """Samples one geometric transform T per example; applies it to images and heatmaps.

    T = random resized crop -> bilinear resize to the input size -> horizontal flip with
    probability `flip_probability` -> each of `geometric_layers` in order. Images then go
    through `photometric_layers`; heatmaps do not.

    Usage in a CGC step:

    ```python
    transform = augmentation.sample(batch_size, height, width)
    x_aug = augmentation.apply_to_images(x_orig, transform)
    ...
    warped = augmentation.apply_to_heatmaps(cam_orig, transform)  # differentiable
    ```

    `transform` is a dict of tensors: `"boxes"` float32 [B, 4] (normalised
    `[y1, x1, y2, x2]`, tf.image.crop_and_resize convention; with
    `crop_mode="torchvision"`, `"crops"` int32 [B, 4] pixel (top, left, height, width)
    instead), `"flips"` bool [B], and
    `"layer_transformations"`, a tuple with the transformation sampled by each geometric
    layer (the layer's own nest; keras-cv's RandomShear puts None in it for an unused
    axis, Keras layers may add Python ints for shapes).

    Randomness: the crop and flip use `keras.random` with a `SeedGenerator(seed)`, so
    `keras.utils.set_random_seed` before building the layer makes them reproducible. Keras
    geometric layers draw from the same SeedGenerator. keras-cv layers draw from their
    own `tf.random.Generator` (TF's global generator unless the keras-cv layer got a
    `seed`), which `keras.utils.set_random_seed` does not reset.

    XLA: the crop and flip compile under `jit_compile=True`, and so do these geometric
    layers: keras-cv RandomFlip, RandomRotation, RandomZoom, RandomTranslation,
    RandomShear and Keras RandomFlip, RandomRotation (the warping ones are applied with
    `resample.projective_transform`, whose gradient is exact). Any other geometric layer runs its
    own code, usually ImageProjectiveTransformV3, which has no XLA kernel and an
    approximate gradient; see `xla_compatible` and `require_xla_compatible()`.

    Args:
        area_range: (min, max) fraction of the image area covered by the crop box,
            0 < min <= max <= 1. (1, 1) disables cropping.
        aspect_ratio_range: (min, max) width / height of the crop box in pixels,
            0 < min <= max; sampled log-uniformly.
        flip_probability: probability of a horizontal flip, in [0, 1].
        geometric_layers: keras-cv vectorized augmentation layers (e.g.
            `keras_cv.layers.RandomRotation`) or Keras image preprocessing layers (e.g.
            `keras.layers.RandomRotation`), applied after the crop and flip with the same
            per-example parameters to images and heatmaps. Heatmaps are always warped
            with bilinear interpolation and a constant 0 fill, whatever the layer's
            `fill_mode` (images keep the layer's own settings).
        photometric_layers: Keras or keras-cv layers applied to images only, after the
            geometric part, as `layer(images, training=True)` (e.g.
            `keras_cv.layers.RandomColorJitter`, `keras.layers.RandomContrast`).
        seed: optional int seed of the SeedGenerator.
        crop_mode: "continuous" (sub-pixel boxes, `"boxes"` in the transform, resampled
            as tf.image.crop_and_resize by `resample.crop_flip_resize`) or "torchvision" (the
            reference's T: integer crops drawn as torchvision's
            RandomResizedCrop.get_params, `"crops"` (i, j, h, w) in the transform,
            resampled as torch's F.interpolate(bilinear, align_corners=False) by
            `resample.resized_crop`).
        name: layer name.
        dtype: layer dtype policy.
    """

    def __init__(
        self,
        area_range=(0.08, 1.0),
        aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
        flip_probability=0.5,
        geometric_layers=(),
        photometric_layers=(),
        seed=None,
        crop_mode="continuous",
        name=None,
        dtype=None,
    ):
        super().__init__(name=name, dtype=dtype)
        if crop_mode not in CROP_MODES:
            raise ValueError(f"`crop_mode` must be one of {CROP_MODES}; received {crop_mode!r}.")
        self.crop_mode = crop_mode
        self.area_range = _check_range(
            "area_range",
            area_range,
            "two numbers (min, max) with 0 < min <= max <= 1 (fractions of the image "
            "area)",
            0.0,
            1.0,
        )
        self.aspect_ratio_range = _check_range(
            "aspect_ratio_range",
            aspect_ratio_range,
            "two finite numbers (min, max) with 0 < min <= max (width / height)",
            0.0,
            math.inf,
        )
        if (
            not isinstance(flip_probability, numbers.Real)
            or not 0.0 <= flip_probability <= 1.0
        ):
            raise ValueError(
                "`flip_probability` must be a number in [0, 1]; received "
                f"{flip_probability!r}."
            )
        self.flip_probability = float(flip_probability)
        if seed is not None and (
            not isinstance(seed, numbers.Integral) or isinstance(seed, bool)
        ):
            raise ValueError(f"`seed` must be None or an int; received {seed!r}.")
        self.seed = seed
        self.geometric_layers = _check_layers("geometric_layers", geometric_layers, True)
        self.photometric_layers = _check_layers(
            "photometric_layers", photometric_layers, False
        )
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.built = True

    @property
    def xla_compatible(self):
        """False if a geometric layer has no XLA path (ImageProjectiveTransformV3)."""
        return not self._xla_incompatible_layers()

    def _xla_incompatible_layers(self):
        return [layer for layer in self.geometric_layers if not _is_xla_compatible(layer)]

    def require_xla_compatible(self):
        """Raises ValueError naming the layers that cannot compile with XLA, if any."""
        offending = self._xla_incompatible_layers()
        if offending:
            names = ", ".join(_describe(layer) for layer in offending)
            raise ValueError(
                f"PairedAugmentation '{self.name}' cannot run under XLA "
                f"(jit_compile=True): geometric_layers {names} have no XLA path (they "
                "warp with ImageProjectiveTransformV3, which has no XLA kernel). Compile "
                "with jit_compile=False, or use only layers with an XLA path: keras-cv "
                "RandomFlip, RandomRotation, RandomZoom, RandomTranslation, RandomShear; "
                "Keras RandomFlip, RandomRotation."
            )

    @_no_autograph
    def sample(self, batch_size, image_height, image_width):
        """Draws one transform per example.

        Args:
            batch_size: int or int32 scalar tensor B.
            image_height: int or int32 scalar tensor, height of the images to transform.
            image_width: int or int32 scalar tensor, width of the images to transform.

        Returns:
            dict with `"boxes"` float32 [B, 4] (crop_mode "continuous") or `"crops"`
            int32 [B, 4] (crop_mode "torchvision"), `"flips"` bool [B] and
            `"layer_transformations"` (tuple, one entry per geometric layer).
        """
        height = tf.cast(image_height, tf.float32)
        width = tf.cast(image_width, tf.float32)
        count = resample.CROP_CANDIDATES
        replicas, first_row = _global_batch_position(batch_size)
        # One draw for the global batch: count areas, count log-ratios, two box
        # offsets, one flip coin per example. Every replica draws the same rows
        # (its seed state is an identical copy) and keeps its own.
        uniforms = keras.random.uniform(
            (batch_size * replicas, 2 * count + 3), seed=self.seed_generator
        )
        if replicas > 1:
            uniforms = uniforms[first_row : first_row + batch_size]
        ranges = (self.area_range, self.aspect_ratio_range)
        if self.crop_mode == "torchvision":
            crops = resample.torchvision_crops(uniforms, image_height, image_width, *ranges)
            geometry = {"crops": crops}
        else:
            geometry = {"boxes": resample.continuous_boxes(uniforms, height, width, *ranges)}
        flips = uniforms[:, 2 * count + 2] < self.flip_probability
        layer_transformations = ()
        if self.geometric_layers:
            # Some layers read the image shape from `images`; this zero-size-channel
            # stand-in carries the shape without costing memory.
            shape_carrier = tf.zeros([batch_size * replicas, image_height, image_width, 0])
            layer_transformations = tuple(
                _replica_rows(
                    self._sample_layer(layer, batch_size * replicas, shape_carrier),
                    first_row,
                    batch_size,
                    replicas,
                )
                for layer in self.geometric_layers
            )
        return {**geometry, "flips": flips, "layer_transformations": layer_transformations}

    def _sample_layer(self, layer, batch_size, shape_carrier):
        if _is_keras_cv_layer(layer):
            return layer.get_random_transformation_batch(batch_size, images=shape_carrier)
        return layer.get_random_transformation(
            shape_carrier, training=True, seed=self.seed_generator
        )

    @staticmethod
    def _apply_layer(layer, images, transformation, heatmaps):
        matrices = _PROJECTIVE_MATRICES.get(type(layer))
        if matrices is not None:
            if heatmaps:
                settings = ("constant", 0.0, "bilinear")
            else:
                settings = (layer.fill_mode, layer.fill_value, layer.interpolation)
            height, width = float(images.shape[1]), float(images.shape[2])
            for matrix in matrices(transformation, height, width):
                images = resample.projective_transform(images, matrix, *settings)
            return images
        if heatmaps:
            layer = _heatmap_variant(layer)
        if _is_keras_cv_layer(layer):
            return layer.augment_images(images, transformations=transformation)
        return layer.transform_images(images, transformation, training=True)

    def _check_transform(self, transform):
        geometry = "crops" if self.crop_mode == "torchvision" else "boxes"
        if not isinstance(transform, dict) or not {geometry, "flips"} <= set(transform):
            raise ValueError(
                f"`transform` must be the dict returned by `sample()` (keys '{geometry}', "
                f"'flips', 'layer_transformations'); received {transform!r}."
            )
        transformations = tuple(transform.get("layer_transformations", ()))
        if len(transformations) != len(self.geometric_layers):
            raise ValueError(
                f"`transform['layer_transformations']` has {len(transformations)} "
                f"entries but this PairedAugmentation has {len(self.geometric_layers)} "
                "geometric layers; pass the dict returned by this layer's `sample()`."
            )
        return transformations

    @_no_autograph
    def _apply_geometric(self, inputs, transform, heatmaps):
        transformations = self._check_transform(transform)
        height = inputs.shape[1]
        width = inputs.shape[2]
        if height is None or width is None:
            raise ValueError(
                "The spatial size of the inputs must be known statically (it sets the "
                f"output size); received shape {inputs.shape}."
            )
        if self.crop_mode == "torchvision":
            outputs = resample.resized_crop(
                inputs, transform["crops"], transform["flips"], (height, width)
            )
        else:
            outputs = resample.crop_flip_resize(
                inputs, transform["boxes"], transform["flips"], (height, width)
            )
        for layer, transformation in zip(self.geometric_layers, transformations):
            outputs = self._apply_layer(layer, outputs, transformation, heatmaps)
        return outputs

    def apply_to_images(self, images, transform):
        """Applies the geometric transform, then the photometric layers, to images.

        Args:
            images: float [B, H, W, C] (integer images are cast to float32).
            transform: the dict returned by `sample(B, H, W)`.

        Returns:
            float [B, H, W, C], same spatial size as the input.
        """
        images = tf.convert_to_tensor(images)
        if images.shape.rank != 4:
            raise ValueError(
                f"`images` must have rank 4 [B, H, W, C]; received shape {images.shape}."
            )
        outputs = self._apply_geometric(images, transform, heatmaps=False)
        for layer in self.photometric_layers:
            outputs = layer(outputs, training=True)
        return outputs

    def apply_to_heatmaps(self, heatmaps, transform):
        """Applies the geometric transform only, differentiably, to heatmaps.

        Bilinear interpolation and a constant 0 fill everywhere (also inside the
        user's geometric layers).

        Args:
            heatmaps: float [B, H, W] or [B, H, W, C] (typically C = 1).
            transform: the dict returned by `sample(B, H, W)`.

        Returns:
            The warped heatmaps, with the rank and shape of `heatmaps`.
        """
        heatmaps = tf.convert_to_tensor(heatmaps)
        rank = heatmaps.shape.rank
        if rank not in (3, 4):
            raise ValueError(
                "`heatmaps` must have shape [B, H, W] or [B, H, W, C]; received shape "
                f"{heatmaps.shape}."
            )
        if rank == 3:
            heatmaps = heatmaps[..., None]
        outputs = self._apply_geometric(heatmaps, transform, heatmaps=True)
        return outputs[..., 0] if rank == 3 else outputs

    def call(self, images, training=True):
        """A random view: `apply_to_images(images, sample(...))`; identity if not training."""
        if not training:
            return images
        images = tf.convert_to_tensor(images)
        dynamic = tf.shape(images)
        transform = self.sample(*(images.shape[i] or dynamic[i] for i in range(3)))
        return self.apply_to_images(images, transform)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        # Not a constructor argument: the layer has no weights.
        config.pop("trainable", None)
        config.update(
            {
                "area_range": self.area_range,
                "aspect_ratio_range": self.aspect_ratio_range,
                "flip_probability": self.flip_probability,
                "geometric_layers": [
                    keras.saving.serialize_keras_object(layer)
                    for layer in self.geometric_layers
                ],
                "photometric_layers": [
                    keras.saving.serialize_keras_object(layer)
                    for layer in self.photometric_layers
                ],
                "seed": self.seed,
                "crop_mode": self.crop_mode,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("geometric_layers", "photometric_layers"):
            config[key] = [
                keras.saving.deserialize_keras_object(layer_config)
                for layer_config in config.get(key, ())
            ]
        return cls(**config)

