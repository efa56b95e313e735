"""advrepro: everything that runs inside one workflow cell (data, models, attacks, training
methods, evaluation, measurement, results).

The package itself imports nothing heavy, so the Snakefile can use :mod:`methods.config` while
building the DAG without importing torch.  Importing :mod:`methods.data`, :mod:`methods.models`
and :mod:`methods.algorithms` fills the dataset, model and method registries.
"""
