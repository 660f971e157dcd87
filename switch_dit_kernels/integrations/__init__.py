"""Adapters that run other libraries' MoE layers on switch_dit_kernels (transformers first).

Each adapter imports its library lazily (inside the functions that need it), so importing
``switch_dit_kernels`` or this package never imports transformers. See
`switch_dit_kernels.integrations.transformers`.
"""
