"""Tiny seeded models shared by the tests."""

import keras


def tiny_convnet(image_size=16, num_classes=3, channels=8, batch_norm=False, seed=0):
    """Two conv blocks -> GAP -> Dense logits; target layer "features"."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = keras.layers.Conv2D(channels, 3, padding="same", activation="relu", name="conv1")(inputs)
    if batch_norm:
        x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Conv2D(channels, 3, strides=2, padding="same", name="conv2")(x)
    x = keras.layers.Activation("relu", name="features")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, logits, name="tiny_convnet")


def tiny_convnet_flatten_head(image_size=16, num_classes=3, channels=4, seed=0):
    """A head without global pooling (Flatten -> Dense): no closed form."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = keras.layers.Conv2D(channels, 3, strides=2, padding="same", name="conv1")(inputs)
    x = keras.layers.Activation("relu", name="features")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, logits, name="tiny_flatten")
