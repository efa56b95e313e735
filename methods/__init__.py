"""advrepro: everything that runs inside one workflow cell (data, models, attacks, training
methods, evaluation, measurement, results).  Importing the package fills the registries."""
