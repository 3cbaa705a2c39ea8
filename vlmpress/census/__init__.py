"""Zoo census: tiny models of every family, run through a real compression round trip.

Owns the tiny-config derivation (:mod:`~vlmpress.census.tiny_configs`: a family's default
transformers config shrunk to a few thousand parameters) and the round-trip rows of the zoo table
(:mod:`~vlmpress.census.causal_lm`: compress -> forward -> save -> load -> dense export -> stock
reload). Sits after the pipeline: may import :mod:`vlmpress.adapters`, :mod:`vlmpress.pipeline`,
:mod:`vlmpress.data`, :mod:`vlmpress.core`, :mod:`vlmpress.io`; nothing imports it but scripts and tests.
"""
