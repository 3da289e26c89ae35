"""`CGCModel`: a keras.Model whose `train_step` adds Contrastive Grad-CAM Consistency.

One step (docs/method.md): views x_xe, x_orig and x_aug = T(x_orig); Grad-CAM of x_orig
and x_aug for the class predicted on x_orig; loss = CE(x_xe) + CE(x_orig) + CE(x_aug) +
lambda_ * L_consistency ("contrastive": CGC's InfoNCE; "mse": the GC baseline).
`consistency="none"` is the plain baseline (one view, one CE, one forward pass);
`lambda_=0` the ablation (consistency reported without gradient). Batches
(`parse_batch`): `(x, y[, sample_weight])` labelled, `x` unlabelled (consistency
only), `((x_l, y_l), x_u)` semi-supervised. `x` is float32 [B, H, W, 3] in [0, 1]
(x_orig) or {"image": x_orig, "classification_view": x_xe}; without x_xe the model
makes it on the device. Details: docs/architecture.md.
"""

import typing
import warnings

import keras
import tensorflow as tf

from cgc_tf import augment as augment_lib
from cgc_tf import distribute
from cgc_tf import explainers
from cgc_tf import gradcam as gradcam_lib
from cgc_tf import losses

IMAGE_KEY = "image"
CLASSIFICATION_VIEW_KEY = "classification_view"
VIEWS = (2, 3)


class Batch(typing.NamedTuple):
    """One batch, parsed once by `parse_batch`; absent parts are None.

    images: float32 [B, H, W, 3] x_orig of the labelled images.
    classification_view: float32 [B, H, W, 3] x_xe made by the input pipeline.
    labels: int [B]; sample_weight: float [B].
    unlabelled_images: float32 [B_u, H, W, 3] x_orig of the unlabelled images.
    """

    images: typing.Any
    classification_view: typing.Any
    labels: typing.Any
    sample_weight: typing.Any
    unlabelled_images: typing.Any


class LossTerms(typing.NamedTuple):
    """The loss terms of one step (float32 scalars) and the metrics' logits.

    total: ce + lambda_ * cgc + regularisation (None until summed); ce: the
    cross-entropy terms' sum; cgc: the consistency loss (None for the plain
    baseline); logits: float32 [B, K] for the compiled metrics (None without labels).
    """

    total: typing.Any
    ce: typing.Any
    cgc: typing.Any
    logits: typing.Any


@keras.saving.register_keras_serializable(package="cgc_tf")
class CGCModel(keras.Model):
    """Wraps a functional classifier and trains it with the CGC objective.

    `model(images)` returns the backbone's logits, so `predict`/`evaluate` work as
    for any classifier; `explain(images)` adds Grad-CAM heatmaps.
    """

    def __init__(
        self,
        backbone,
        target_layer=None,
        lambda_=0.5,
        temperature=0.5,
        consistency="contrastive",
        views=3,
        augmentation=None,
        global_negatives=False,
        name=None,
        trainable=True,
    ):
        """Builds the model.

        Args:
          backbone: built functional or Sequential keras.Model, float32 images
            [B, H, W, 3] in [0, 1] -> logits [B, K], or a softmax over them (e.g. a
            keras.applications model), which is trained on its logits
            (`gradcam.logits_model`; `self.backbone` is that logits model).
          target_layer: Grad-CAM layer name (spatial or token-grid output); None
            picks `cgc_tf.explainers.auto_target_layer`'s choice.
          lambda_: weight of the consistency loss (0 = the lambda=0 ablation: the
            multi-view step; the consistency loss is still computed and reported,
            without gradient).
          temperature: InfoNCE temperature, > 0.
          consistency: "contrastive" (CGC), "mse" (GC baseline) or "none" (the
            plain baseline: one view, one cross-entropy, no Grad-CAM in the step;
            lambda_ and temperature are unused; labelled batches only).
          views: 3 = docs/method.md (CE on x_xe, x_orig, x_aug); 2 = the faster variant
            without x_xe (CE on x_orig and x_aug).
          augmentation: `cgc_tf.augment.PairedAugmentation` for T; None = the
            paper's random resized crop + horizontal flip.
          global_negatives: gather the augmented heatmaps of all replicas as extra
            negatives (no effect with one replica).
          name, trainable: as keras.Model.
        """
        super().__init__(name=name, trainable=trainable)
        if not isinstance(backbone, keras.Model) or not hasattr(backbone, "inputs"):
            raise ValueError(
                f"backbone must be a functional keras.Model, got {type(backbone).__name__}"
            )
        if consistency not in losses.CONSISTENCY_LOSSES:
            raise ValueError(
                f"consistency={consistency!r} is not one of {losses.CONSISTENCY_LOSSES}"
            )
        if temperature <= 0:
            raise ValueError(f"temperature={temperature!r} must be > 0")
        if lambda_ < 0:
            raise ValueError(f"lambda_={lambda_!r} must be >= 0")
        if views not in VIEWS:
            raise ValueError(f"views={views!r} must be one of {VIEWS}")
        # The model as given, for get_config; a classifier ending in a softmax
        # trains and is explained on its logits (same weights).
        self.source_backbone = backbone
        self.backbone = gradcam_lib.logits_model(backbone)
        self.target_layer = target_layer or explainers.auto_target_layer(self.backbone)
        self.lambda_ = float(lambda_)
        self.temperature = float(temperature)
        self.consistency = consistency
        self.views = int(views)
        self.global_negatives = bool(global_negatives)
        self.augmentation = augmentation or augment_lib.PairedAugmentation()
        # The classification view's augmentation when the pipeline did not make it.
        self.classification_augmentation = augment_lib.PairedAugmentation()
        self.extractor = gradcam_lib.feature_model(backbone, self.target_layer)
        self.image_size = tuple(backbone.inputs[0].shape[1:3])
        self.ce_loss_tracker = keras.metrics.Mean(name="ce_loss")
        # The plain baseline has no consistency loss to report.
        self.cgc_loss_tracker = None if self.is_plain else keras.metrics.Mean(name="cgc_loss")
        # The backbone is built, so this model is too. Without this, Keras builds
        # it symbolically under a strategy by calling it on the first batch's
        # structure, which fails for semi-supervised ((x_l, y_l), x_u) batches.
        self.built = True

    @property
    def is_plain(self):
        """True for the plain baseline (consistency="none"): one view, one cross-entropy."""
        return self.consistency == "none"

    @property
    def trains_consistency(self):
        """True when the consistency loss contributes gradients."""
        return self.lambda_ > 0 and not self.is_plain

    def call(self, inputs, training=False):
        """Logits float32 [B, K] of images (or of the dict's "image")."""
        if isinstance(inputs, dict):
            inputs = inputs[IMAGE_KEY]
        return self.backbone(inputs, training=training)

    def compile(self, optimizer="sgd", loss=None, metrics=None, jit_compile="auto", **kwargs):
        """As keras.Model.compile; the loss is the CGC objective, so `loss` must be None."""
        if loss is not None:
            raise ValueError(
                f"loss={loss!r}: CGCModel computes its own cross-entropy + consistency loss; "
                "configure it with the constructor (lambda_, temperature, consistency)"
            )
        if jit_compile is True:
            self.augmentation.require_xla_compatible()
        super().compile(optimizer=optimizer, metrics=metrics, jit_compile=jit_compile, **kwargs)
        if self.jit_compile and not self.augmentation.xla_compatible:
            # "auto" chose XLA (an accelerator is present); fall back rather than fail.
            self.jit_compile = False
        self._build_compiled_metrics()

    def compile_from_config(self, config):
        """Recompiles a model loaded from a `.keras` file (optimizer, metrics, jit_compile).

        Keras skips this for models whose `compile` is overridden (with a warning),
        which would leave a loaded CGCModel without its optimizer and its slots.
        Same steps as `keras.Model.compile_from_config`, through our `compile`.
        """
        try:
            config = keras.saving.deserialize_keras_object(config)
        except (TypeError, ValueError) as error:
            # E.g. an optimizer or schedule class this process does not know: the
            # weights still load; only training needs the optimizer.
            warnings.warn(
                f"{self.name}: loaded without its optimizer ({error}); call compile() "
                "before training it further",
                stacklevel=2,
            )
            return
        config.pop("loss", None)  # Always None: the CGC objective is built in.
        self.compile(**config)
        if getattr(self, "optimizer", None) is not None and self.built:
            # Create the optimizer's variables so the saved values can load into them.
            self.optimizer.build(self.trainable_variables)

    def _build_compiled_metrics(self):
        """Builds the compiled metrics on symbolic labels and logits.

        Keras builds them from the first batch otherwise, which it cannot do for
        unlabelled or semi-supervised batches under a strategy.
        """
        num_classes = self.backbone.outputs[0].shape[-1]
        for metric in self.metrics:
            if metric is self.ce_loss_tracker or metric is self.cgc_loss_tracker or metric.name == "loss":
                continue
            if not getattr(metric, "built", True):
                metric.build(
                    keras.KerasTensor((None,), "int32"),
                    keras.KerasTensor((None, num_classes), "float32"),
                )

    # ----------------------------------------------------------------- views
    def consistency_terms(self, x_orig, training):
        """Forward x_orig and x_aug = T(x_orig); Grad-CAM both; the consistency loss.

        Args:
          x_orig: float32 [B, H, W, 3] the deterministic view.
          training: BatchNorm mode.

        Returns:
          dict with logits_orig, logits_aug (float32 [B, K]), loss (scalar), and
          anchors/positives (float32 [B, H*W]).
        """
        height, width = self.image_size
        batch_size = tf.shape(x_orig)[0]
        transform = self.augmentation.sample(batch_size, height, width)
        x_aug = self.augmentation.apply_to_images(x_orig, transform)
        logits_orig, cam_orig, class_index = gradcam_lib.gradcam(
            self.extractor, x_orig, training=training
        )
        logits_aug, cam_aug, _ = gradcam_lib.gradcam(
            self.extractor, x_aug, class_index=class_index, training=training
        )
        cam_orig = gradcam_lib.sum_normalize(gradcam_lib.upsample(cam_orig, (height, width)))
        cam_aug = gradcam_lib.sum_normalize(gradcam_lib.upsample(cam_aug, (height, width)))
        warped = self.augmentation.apply_to_heatmaps(cam_orig, transform)
        anchors = losses.flatten_and_normalize(cam_aug)
        positives = losses.flatten_and_normalize(warped)
        negatives, self_offset = None, 0
        if self.global_negatives:
            negatives, self_offset = distribute.all_gather_with_offset(anchors)
        loss = losses.consistency_loss(
            self.consistency, anchors, positives, self.temperature, negatives, self_offset
        )
        if not self.trains_consistency:
            loss = tf.stop_gradient(loss)
        return {
            "logits_orig": logits_orig,
            "logits_aug": logits_aug,
            "loss": loss,
            "anchors": anchors,
            "positives": positives,
        }

    # ------------------------------------------------------------ train/test
    def train_step(self, data):
        """One optimizer step on a batch (replica code under tf.distribute)."""
        batch = self._parse(data)
        # Forward and backward, the consistency part and the classification part
        # each in a tape of its own.
        terms, gradients = self._loss_and_gradients(batch)
        # The update; the trackers get the unscaled loss terms.
        self.optimizer.apply(gradients, self.trainable_variables)
        return self._update_metrics(terms, batch)

    def test_step(self, data):
        """Evaluation: the training step's loss terms on the given view, no update.

        CE of x_orig (of the labelled images), the consistency loss under a random
        T; the plain baseline: CE of x_orig only (one forward pass).
        """
        batch = self._parse(data)
        return self._update_metrics(self._forward(batch, training=False), batch)

    def _forward(self, batch, training):
        """All the step's forward passes and loss terms (`LossTerms`) in one go.

        test_step's loss; the one-tape equivalent of `_loss_and_gradients`.
        """
        terms = self._first_part(batch, training)
        if self._has_classification_part(batch, training):
            terms = _merge(terms, self._classification_part(batch, training))
        return terms._replace(total=self._total_loss(terms, training))

    def _loss_and_gradients(self, batch):
        """`_forward(batch, training=True)` and its gradients, one tape per part.

        The sum of the two tapes' gradients equals one tape over the whole loss. The
        classification part shares only the weights with the first part and its
        forward pass starts after the first part's gradients are computed, so the
        first part's activations are freed by then: the step's peak memory holds the
        activations of the x_orig and x_aug passes, not of all three views. Forward
        passes (BatchNorm updates, random draws) run in `_forward`'s order.

        Returns:
          (`LossTerms`, gradients: one per trainable variable (None if it does not
          reach the loss), scaled as `optimizer.scale_loss` and
          `distribute.scale_loss_for_replicas` scale the loss).
        """
        variables = self.trainable_variables
        # 1. Consistency part (the plain baseline: its one forward pass), with the
        #    regularisation losses.
        with tf.GradientTape() as tape:
            terms = self._first_part(batch, training=True)
            terms = terms._replace(total=self._total_loss(terms, training=True))
            scaled = self.optimizer.scale_loss(distribute.scale_loss_for_replicas(terms.total))
        gradients = tape.gradient(scaled, variables)
        if not self._has_classification_part(batch, training=True):
            return terms, gradients
        # 2. Classification part in a tape of its own, after part 1's gradients.
        batch = _after(gradients, batch)
        with tf.GradientTape() as tape:
            classification = self._classification_part(batch, training=True)
            scaled = self.optimizer.scale_loss(
                distribute.scale_loss_for_replicas(classification.ce)
            )
        gradients = [
            _add_gradients(first, second)
            for first, second in zip(gradients, tape.gradient(scaled, variables))
        ]
        terms = _merge(terms, classification)
        return terms._replace(total=self._total_loss(terms, training=True)), gradients

    def _parse(self, data):
        """The `Batch` of any batch structure `fit` accepts; checks it suits the model."""
        batch = parse_batch(data)
        if self.is_plain and batch.unlabelled_images is not None:
            raise ValueError(
                "consistency='none' (the plain baseline) trains on labelled (x, y) batches "
                "only, got an unlabelled or semi-supervised ((x_l, y_l), x_u) batch; its "
                "unlabelled images would contribute nothing. Use consistency='contrastive' "
                "or 'mse' to train on unlabelled images"
            )
        return batch

    def _first_part(self, batch, training):
        """The consistency part; for the plain baseline its one classification forward."""
        if self.is_plain:
            return self._classification_part(batch, training)
        return self._consistency_part(batch, training)

    def _consistency_part(self, batch, training):
        """The x_orig and x_aug forward passes and every loss term that reads them.

        Labelled batch: CE(x_orig) (+ CE(x_aug) in training) and the consistency
        loss; unlabelled or semi-supervised batch: the consistency loss of the
        unlabelled images (CE 0, no logits: their labels are elsewhere).
        """
        if batch.unlabelled_images is not None:
            terms = self.consistency_terms(batch.unlabelled_images, training)
            return LossTerms(None, tf.constant(0.0), terms["loss"], None)
        terms = self.consistency_terms(batch.images, training)
        ce = _cross_entropy(batch.labels, terms["logits_orig"], batch.sample_weight)
        logits = terms["logits_orig"]
        if training:
            # Accuracy on the augmented view, as the reference code reports.
            logits = terms["logits_aug"]
            ce += _cross_entropy(batch.labels, logits, batch.sample_weight)
        return LossTerms(None, ce, terms["loss"], logits)

    def _has_classification_part(self, batch, training):
        """True when a CGC step has a labelled view outside the consistency part.

        x_xe in training with views=3, or the labelled half of a semi-supervised batch.
        """
        if self.is_plain or batch.labels is None:
            return False
        return batch.unlabelled_images is not None or (training and self.views == 3)

    def _classification_part(self, batch, training):
        """CE of the one view a labelled batch trains on outside the consistency part.

        x_xe with views=3; with views=2 (whose CE views are x_orig and T(x_orig), not
        x_xe) a T(x_orig) of its own; x_orig in evaluation. No consistency loss.
        """
        images = batch.images
        if training and self.views == 3:
            images = batch.classification_view
            if images is None:
                images = self.classification_augmentation(batch.images, training=True)
        elif training:
            images = self.augmentation(batch.images, training=True)
        logits = self.backbone(images, training=training)
        ce = _cross_entropy(batch.labels, logits, batch.sample_weight)
        return LossTerms(None, ce, None, logits)

    def _total_loss(self, terms, training):
        """ce + lambda_ * cgc (when the consistency trains) + the regularisation losses."""
        total = terms.ce
        if self.trains_consistency:
            total = total + self.lambda_ * terms.cgc
        if training and self.losses:
            total = total + tf.add_n([tf.cast(l, tf.float32) for l in self.losses])
        return total

    def _update_metrics(self, terms, batch):
        """Trackers get the unscaled loss terms; compiled metrics the labelled logits."""
        for metric in self.metrics:
            if metric is self.ce_loss_tracker:
                metric.update_state(terms.ce)
            elif metric is self.cgc_loss_tracker:
                metric.update_state(terms.cgc)
            elif metric.name == "loss":
                metric.update_state(terms.total)
            elif batch.labels is not None:
                metric.update_state(batch.labels, terms.logits, sample_weight=batch.sample_weight)
        return self.get_metrics_result()

    # --------------------------------------------------------------- explain
    def explain(self, images, class_index=None, method="gradient_x_activation"):
        """Predictions and Grad-CAM heatmaps at the input resolution.

        The same computation as `cgc_tf.explain` (`gradcam.explain_batch`) on the
        backbone and `target_layer`.

        Args:
          images: float32 [B, H, W, 3] in [0, 1].
          class_index: optional int or int [B] class to explain per example;
            default the predicted class.
          method: one of `cgc_tf.gradcam.METHODS`; the default is the form CGC
            trains (equal to "gradcam" and "closed_form" for pooling + dense heads).

        Returns:
          dict of tensors: "probabilities" float32 [B, K] (softmax of the logits),
          "class_id" int32 [B] (argmax), "heatmap" float32 [B, H, W] (ReLU'd,
          bilinearly upsampled, not normalised) for `class_index` or the prediction.
        """
        images = tf.convert_to_tensor(images, tf.float32)
        if class_index is None:
            return self._explain_predicted(images, method)
        return self._explain_class(images, tf.convert_to_tensor(class_index, tf.int32), method)

    @tf.function(reduce_retracing=True)
    def _explain_predicted(self, images, method):
        return self._explain(images, None, method)

    @tf.function(reduce_retracing=True)
    def _explain_class(self, images, class_index, method):
        return self._explain(images, class_index, method)

    def _explain(self, images, class_index, method):
        dense = None
        if method == "closed_form":
            dense = gradcam_lib.pooling_dense_head(self.backbone, self.target_layer)
        explained = gradcam_lib.explain_batch(self.extractor, images, class_index, method, dense)
        logits = explained["logits"]
        return {
            "probabilities": tf.nn.softmax(logits),
            "class_id": tf.argmax(logits, axis=-1, output_type=tf.int32),
            "heatmap": explained["heatmap"],
        }

    # ------------------------------------------------------------ serialise
    def get_config(self):
        return {
            "backbone": keras.saving.serialize_keras_object(self.source_backbone),
            "target_layer": self.target_layer,
            "lambda_": self.lambda_,
            "temperature": self.temperature,
            "consistency": self.consistency,
            "views": self.views,
            "augmentation": keras.saving.serialize_keras_object(self.augmentation),
            "global_negatives": self.global_negatives,
            "name": self.name,
            "trainable": self.trainable,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        config["augmentation"] = keras.saving.deserialize_keras_object(config["augmentation"])
        return cls(**config)


def parse_batch(data):
    """`Batch` of any structure `CGCModel.fit` accepts (see the module docstring)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (tuple, list)):
        labelled, unlabelled = keras.utils.unpack_x_y_sample_weight(tuple(data[0])), data[1]
    else:
        labelled, unlabelled = keras.utils.unpack_x_y_sample_weight(data), None
        if labelled[1] is None:
            labelled, unlabelled = (None, None, None), labelled[0]
    x, labels, sample_weight = labelled
    images, classification_view = _split_views(x)
    return Batch(images, classification_view, labels, sample_weight, _split_views(unlabelled)[0])


def _split_views(x):
    """(x_orig, x_xe or None) of an image tensor, a dict batch or None."""
    if isinstance(x, dict):
        return x[IMAGE_KEY], x.get(CLASSIFICATION_VIEW_KEY)
    return x, None


def _cross_entropy(labels, logits, sample_weight):
    """Mean sparse CE from logits (float32), weighted by sample_weight [B] if given."""
    per_example = keras.losses.sparse_categorical_crossentropy(
        labels, tf.cast(logits, tf.float32), from_logits=True
    )
    if sample_weight is None:
        return tf.reduce_mean(per_example)
    sample_weight = tf.cast(tf.reshape(sample_weight, [-1]), tf.float32)
    return tf.reduce_sum(per_example * sample_weight) / tf.maximum(
        tf.reduce_sum(sample_weight), 1e-12
    )


def _merge(first, classification):
    """The first part's terms plus the classification part's CE.

    The metrics read the first part's logits when it has some (the augmented view of
    a labelled batch), else the classification part's (semi-supervised batches).
    """
    logits = first.logits if first.logits is not None else classification.logits
    return first._replace(ce=first.ce + classification.ce, logits=logits)


def _after(dependencies, structure):
    """`structure` (a nest of tensors or None) behind control dependencies.

    The ops that read the returned tensors run after every tensor of `dependencies`
    (a nest, None entries allowed) is computed. A no-op in eager mode.
    """
    dependencies = [
        tensor
        for tensor in tf.nest.flatten(dependencies, expand_composites=True)
        if tensor is not None
    ]
    with tf.control_dependencies(dependencies):
        return tf.nest.map_structure(
            lambda tensor: None if tensor is None else tf.identity(tensor), structure
        )


def _add_gradients(first, second):
    """Sum of two gradients of one variable, either of which may be None."""
    if first is None:
        return second
    if second is None:
        return first
    return tf.convert_to_tensor(first) + tf.convert_to_tensor(second)
