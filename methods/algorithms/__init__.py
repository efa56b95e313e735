"""Training methods; importing this package registers every method in ``METHODS``."""
from . import base, standard, fgsm_rs, nfgsm, pgd_at, bb, selective  # noqa: F401
