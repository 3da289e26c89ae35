"""Annotated evaluation images at their native resolution, for the paper's protocol.

`voc_folder_examples(root, class_names)` reads a flat image folder with one
Pascal-VOC XML per image (the reference's TorchRay layout); `tfds_examples(...)`
reads a tfds dataset with boxes. Both yield dicts: "name" str, "image" uint8
[H, W, 3] (never resized), "label" int, "boxes" float32 [N, 4] normalised
[ymin, xmin, ymax, xmax], "box_labels" int32 [N]. XML and class-name rules:
docs/data.md (annotated images).
"""

import os
import xml.etree.ElementTree as ElementTree

import numpy as np
import tensorflow as tf

from cgc_tf.data import decode
from cgc_tf.data import sources

IMAGE_FOLDER = "val"
ANNOTATION_FOLDER = "annotation"
# TorchRay lists .JPEG and .jpg; PNG is accepted as well.
_EXTENSIONS = (".jpeg", ".jpg", ".png")


def _xml_error(path, problem):
    return ValueError(f"annotation {path!r}: {problem}")


def _int_field(node, field, path):
    text = node.findtext(field)
    if text is None or not text.strip():
        raise _xml_error(path, f"<{node.tag}> has no <{field}>")
    try:
        # TorchRay applies int() to the text, which only accepts integers; a
        # decimal such as "12.0" is truncated here instead of failing.
        return int(float(text.strip()))
    except ValueError:
        raise _xml_error(path, f"<{field}> is {text.strip()!r}, not a number") from None


def read_voc_annotation(path):
    """Parses one Pascal-VOC XML file.

    Args:
      path: str, the XML file.

    Returns:
      dict: "width", "height" (ints, from `<size>`) and "objects", a list of
      (name str, xmin, ymin, xmax, ymax ints, 1-based inclusive), in file order.

    Raises:
      ValueError: naming the file, if it is missing, not XML, has no `<size>`,
        no `<object>`, or an object without a name or a complete `<bndbox>`.
    """
    if not os.path.isfile(path):
        raise _xml_error(path, "file not found (every image needs <stem>.xml beside the others)")
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        raise _xml_error(path, f"not valid XML ({error})") from None
    size = root.find("size")
    if size is None:
        raise _xml_error(path, "no <size> (the box coordinates need the image's frame)")
    width, height = _int_field(size, "width", path), _int_field(size, "height", path)
    if width < 1 or height < 1:
        raise _xml_error(path, f"<size> is {width}x{height}, must be positive")
    objects = []
    for node in root.findall("object"):
        name = (node.findtext("name") or "").strip()
        if not name:
            raise _xml_error(path, "an <object> has no <name>")
        box = node.find("bndbox")
        if box is None:
            raise _xml_error(path, f"<object> {name!r} has no <bndbox>")
        coordinates = [_int_field(box, field, path) for field in ("xmin", "ymin", "xmax", "ymax")]
        objects.append((name, *coordinates))
    if not objects:
        raise _xml_error(path, "no <object> (the first object's class is the image's label)")
    return {"width": width, "height": height, "objects": objects}


def class_index(name, class_names):
    """The label index of a class name (docs/data.md, annotated images), or None.

    Args:
      name: str, an XML `<name>`.
      class_names: sequence of str, the model's classes in label order.
    """
    lookup = {class_name: index for index, class_name in enumerate(class_names)}
    if name in lookup:
        return lookup[name]
    prefix = name.split(".")[0]
    if prefix.isdigit() and 1 <= int(prefix) <= len(class_names):
        return int(prefix) - 1
    return None


def voc_boxes(annotation, class_names):
    """(boxes float32 [N, 4] normalised [ymin, xmin, ymax, xmax], box_labels int32 [N])."""
    width, height = annotation["width"], annotation["height"]
    boxes, labels = [], []
    for name, xmin, ymin, xmax, ymax in annotation["objects"]:
        index = class_index(name, class_names)
        labels.append(-1 if index is None else index)
        boxes.append([(ymin - 1) / height, (xmin - 1) / width, ymax / height, xmax / width])
    return np.asarray(boxes, np.float32).reshape([-1, 4]), np.asarray(labels, np.int32)


def list_voc_folder(root):
    """Sorted (image path, XML path) pairs of a flat VOC folder (module docstring).

    Raises:
      ValueError: if root/val has no image, or an image has no XML file.
    """
    image_dir = os.path.join(root, IMAGE_FOLDER)
    annotation_dir = os.path.join(root, ANNOTATION_FOLDER)
    if not os.path.isdir(image_dir) or not os.path.isdir(annotation_dir):
        raise ValueError(
            f"annotated folder {root!r} must contain {IMAGE_FOLDER}/ (flat images) and "
            f"{ANNOTATION_FOLDER}/ (one Pascal-VOC XML per image)"
        )
    images = sorted(
        os.path.join(image_dir, name)
        for name in os.listdir(image_dir)
        if not name.startswith(".") and os.path.splitext(name)[1].lower() in _EXTENSIONS
    )
    if not images:
        raise ValueError(f"{image_dir!r} has no images ({', '.join(_EXTENSIONS)})")
    pairs = []
    for image in images:
        stem = os.path.splitext(os.path.basename(image))[0]
        xml = os.path.join(annotation_dir, stem + ".xml")
        if not os.path.isfile(xml):
            raise ValueError(f"image {image!r} has no annotation: expected {xml!r}")
        pairs.append((image, xml))
    return pairs


def voc_folder_examples(root, class_names):
    """Yields the example dicts of a flat VOC folder, in sorted file order.

    Args:
      root: str, the folder holding val/ and annotation/.
      class_names: sequence of str, the model's classes in label order.

    Yields:
      example dicts (module docstring).

    Raises:
      ValueError: a missing or malformed XML, a first object whose class is not
        in `class_names`, or an image whose decoded size differs from the XML's
        `<size>` (its boxes would be in another frame).
    """
    class_names = list(class_names)
    for image_path, xml_path in list_voc_folder(root):
        annotation = read_voc_annotation(xml_path)
        boxes, box_labels = voc_boxes(annotation, class_names)
        first = annotation["objects"][0][0]
        if box_labels[0] < 0:
            raise ValueError(
                f"annotation {xml_path!r}: the first object's class {first!r} is not one of "
                f"the {len(class_names)} classes (e.g. {class_names[:3]}); pass the model's "
                "class list"
            )
        with open(image_path, "rb") as file:
            image = decode.decode_image(file.read()).numpy()
        if image.shape[:2] != (annotation["height"], annotation["width"]):
            raise ValueError(
                f"image {image_path!r} is {image.shape[1]}x{image.shape[0]} but its annotation "
                f"{xml_path!r} gives <size> {annotation['width']}x{annotation['height']}"
            )
        yield {
            "name": image_path,
            "image": image,
            "label": int(box_labels[0]),
            "boxes": boxes,
            "box_labels": box_labels,
        }


def tfds_examples(dataset, data_dir=None, image_size=32, split=None):
    """Yields the example dicts of a tfds dataset with boxes, in stored order.

    Args:
      dataset: a tfds name with a BBoxFeature, e.g. "cluttered_digits".
      data_dir: tfds data directory.
      image_size: int, selects the embedded dataset's canvas size.
      split: split name; None: the dataset's evaluation split.

    Raises:
      ValueError: unknown dataset, no boxes, no evaluation split.
    """
    source = sources.resolve(dataset, data_dir, image_size)
    info = source.info
    if not info.has_bounding_boxes:
        raise ValueError(
            f"dataset={dataset!r} has no bounding boxes; the paper protocol needs them"
        )
    split = split or info.eval_split
    if split is None:
        raise ValueError(f"dataset={dataset!r} has no evaluation split; pass split")
    records = source.records(split, with_boxes=True)
    for record in records.read().as_numpy_iterator():
        label = int(record["label"])
        boxes = np.asarray(record["bbox"], np.float32).reshape([-1, 4])
        name = record["name"].decode("utf-8")
        image = decode.decode_or_fail(tf.constant(name), encoded=record["encoded"]).numpy()
        yield {
            "name": name,
            "image": image,
            "label": label,
            "boxes": boxes,
            "box_labels": np.full([len(boxes)], label, np.int32),
        }
