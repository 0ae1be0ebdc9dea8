"""Objective terms, one module per method, each holding its config schema and its term (registered on import),
over the pure loss math of `functional`. Importing this package registers every built-in term, in the order
below: the order in which `mutualkd` lists them (online terms first, then the offline teachers' terms)."""

from mutualkd.losses import (  # noqa: F401, I001  (registration, in this order)
    ce,
    dml,
    dot,
    mcl,
    mcl_okd,
    kd,
    fitnet,
    at,
    fsp,
    nst,
    relation,
    adain,
    ama,
    complementary,
    reconstruction,
    lwkd,
)
