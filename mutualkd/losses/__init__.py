"""Objective terms, one module per method, each holding its config schema and its term (registered on import),
over the pure loss math of `functional`. Importing this package registers every built-in term."""

from mutualkd.losses import (  # noqa: F401  (registration order: the order `mutualkd` lists the terms in)
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
