"""Training methods; importing this package registers every method in ``METHODS``.

Every module of this package is imported here, so a new method is one new module with a
``@METHODS.register(...)`` class: nothing else needs to list it.
"""
import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
