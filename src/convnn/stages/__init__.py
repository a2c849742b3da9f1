"""The ConvNN operator's stages, one module each, in the order they run:

1. :mod:`~convnn.stages.candidates` - which keys each query may select (and the map geometry);
2. :mod:`~convnn.stages.similarity` - the scores selection ranks and weighting reads (the
   metrics' maths is :mod:`convnn.metrics`);
3. :mod:`~convnn.stages.selection` - the K best candidates;
4. :mod:`~convnn.stages.weighting` - rho over the K selected scores;
5. :mod:`~convnn.stages.aggregation` - y = sum_k W_k rho_k v_k + b.

:func:`convnn.functional._operator` runs them as one labelled pipeline.
"""
