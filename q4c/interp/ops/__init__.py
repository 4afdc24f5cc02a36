"""Op implementations, one module per family; importing this package registers them all."""

from __future__ import annotations

from q4c.interp.ops import (  # noqa: F401  (imported for their @op registrations)
    contrib,
    control,
    math,
    nn,
    pool,
    quant,
    reduce,
    rnn,
    shape,
    tensor,
)
