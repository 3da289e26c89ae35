"""absl flags generated from `cgc_tf.config.TrainConfig`: one flag per field.

A flag's name, default, type and help text are its field's (the help text and the
choices of an enum live in the field's metadata), so a training setting is written
once, in cgc_tf/config.py. cgc-train defines every field's flag; cgc-evaluate
defines the few it shares with training (dataset, data_dir, ...) with its own
defaults. Binary-side: the library never imports absl.flags.

Flag types follow the field annotations: bool, int, float, str (an enum when the
field has choices), list[int] (a repeated flag); Optional[X] is X with an unset default.
An int field's choices (views) are checked by `TrainConfig.validate`: absl enums are strings.
"""

import dataclasses
import typing

from absl import flags

from cgc_tf import config as config_lib

_FIELDS = {field.name: field for field in dataclasses.fields(config_lib.TrainConfig)}


def _value_type(field):
    """The field's annotation without Optional: bool, int, float, str or list[int]."""
    annotation = field.type
    if typing.get_origin(annotation) is typing.Union:
        (annotation,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return annotation


def _define(field, default, help_text, flag_values):
    """Defines the flag of one field; returns its FlagHolder."""
    value_type = _value_type(field)
    choices = field.metadata.get("choices")
    arguments = dict(name=field.name, default=default, help=help_text, flag_values=flag_values)
    if value_type is bool:
        return flags.DEFINE_bool(**arguments)
    if value_type is int:
        return flags.DEFINE_integer(**arguments)
    if value_type is float:
        return flags.DEFINE_float(**arguments)
    if value_type is str and choices:
        return flags.DEFINE_enum(enum_values=list(choices), **arguments)
    if value_type is str:
        return flags.DEFINE_string(**arguments)
    if value_type == list[int]:
        return flags.DEFINE_multi_integer(**arguments)
    raise TypeError(f"TrainConfig.{field.name}: no flag type for annotation {field.type!r}")


def define_config_flags(names=None, defaults=None, notes=None, flag_values=flags.FLAGS):
    """Defines an absl flag per TrainConfig field (and the field's aliases).

    Args:
      names: iterable of str, the fields to define; None: every field, in field order.
      defaults: dict {field name: default} replacing TrainConfig's default, e.g.
        None for "read from the model_dir" in cgc-evaluate.
      notes: dict {field name: str} appended to the field's help text.
      flag_values: absl FlagValues to define the flags in.

    Returns:
      dict {field name: absl FlagHolder}, in the order of `names`.

    Raises:
      ValueError: if a name in `names`, `defaults` or `notes` is not a TrainConfig field.
    """
    names = list(_FIELDS) if names is None else list(names)
    defaults, notes = dict(defaults or {}), dict(notes or {})
    unknown = sorted((set(names) | set(defaults) | set(notes)) - set(_FIELDS))
    if unknown:
        raise ValueError(f"names={unknown} are not TrainConfig fields; fields are {list(_FIELDS)}")
    holders = {}
    for name in names:
        field = _FIELDS[name]
        help_text = " ".join(filter(None, [field.metadata["help"], notes.get(name)]))
        holders[name] = _define(field, defaults.get(name, field.default), help_text, flag_values)
        for alias in field.metadata.get("aliases", ()):
            flags.DEFINE_alias(alias, name, flag_values=flag_values)
    return holders


def config_from_flags(holders):
    """The TrainConfig of parsed flags: the holders' values, TrainConfig's defaults elsewhere.

    Args:
      holders: dict {field name: absl FlagHolder} from `define_config_flags`, parsed.

    Returns:
      cgc_tf.config.TrainConfig (not validated).
    """
    return config_lib.TrainConfig(**{name: holder.value for name, holder in holders.items()})
