"""One vocabulary for exceptions: every class nodekeeper defines is in errors.py's tree."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import nodekeeper
from nodekeeper import errors


def defined_exceptions() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for module in pkgutil.walk_packages(nodekeeper.__path__, "nodekeeper."):
        if module.name.startswith("nodekeeper._proto") or module.name.endswith("__main__"):
            continue
        loaded = importlib.import_module(module.name)
        for name, value in vars(loaded).items():
            if (inspect.isclass(value) and issubclass(value, BaseException)
                    and value.__module__ == module.name):
                found[f"{module.name}.{name}"] = value
    return found


def test_every_exception_class_is_drawn_in_the_tree() -> None:
    classes = defined_exceptions()
    assert "nodekeeper.errors.ApiError" in classes  # the walk finds them
    tree = errors.__doc__ or ""
    missing = [path for path, cls in classes.items() if f" {cls.__name__} " not in tree
               and f".{cls.__name__} " not in tree]
    assert missing == []


def test_those_in_errors_py_share_its_base_or_the_failure_vocabulary() -> None:
    for path, cls in defined_exceptions().items():
        if path.startswith("nodekeeper.errors."):
            assert issubclass(cls, (errors.NodekeeperError, errors.Failure)), path
