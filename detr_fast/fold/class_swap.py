"""Subclasses made at run time for modules of other libraries (timm, transformers), swapped in place.

detr_fast changes what a module of another library computes by swapping its ``__class__`` for a
subclass that replaces some methods: the module keeps its attributes, children, parameters (the
same objects) and state_dict keys, and ``isinstance`` checks against its class still hold. The
subclass for a (base class, variant) pair is made once. Instances pickle (and deepcopy) as their
base class plus the variant's name, so they load wherever the base class imports.
"""
from typing import Callable, Dict, Tuple

from torch import nn

_VARIANTS: Dict[str, Dict[str, Callable]] = {}
_CLASSES: Dict[Tuple[type, str], type] = {}


def register_variant(name: str, methods: Dict[str, Callable]) -> str:
    """Declare the methods a variant replaces; returns ``name``."""
    _VARIANTS[name] = methods
    return name


def swapped_class(base: type, variant: str) -> type:
    """The subclass of ``base`` with ``variant``'s methods."""
    key = (base, variant)
    cls = _CLASSES.get(key)
    if cls is None:
        attrs = dict(_VARIANTS[variant])
        attrs.update(__module__=__name__, __reduce_ex__=_reduce, _detr_fast_base=base, _detr_fast_variant=variant,
                     __doc__=f"{base.__qualname__} as detr_fast runs it ({variant}).")
        cls = type(f"Fast{base.__name__}", (base,), attrs)
        _CLASSES[key] = cls
    return cls


def base_class(module: nn.Module) -> type:
    """The class ``module`` had before detr_fast swapped it (its own class when not swapped)."""
    return type(module).__dict__.get("_detr_fast_base", type(module))


def variant_of(module: nn.Module) -> str:
    """The variant ``module`` runs as, or "" when its class was not swapped here."""
    return type(module).__dict__.get("_detr_fast_variant", "")


def _reduce(self: nn.Module, protocol: int):
    cls = type(self)
    return (_restore, (cls.__dict__["_detr_fast_base"], cls.__dict__["_detr_fast_variant"]), self.__dict__)


def _restore(base: type, variant: str) -> nn.Module:
    module = base.__new__(base)
    module.__class__ = swapped_class(base, variant)
    return module
