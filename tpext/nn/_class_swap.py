"""The old name of tpext.nn.class_swap, kept for the importers that still use it (tpext.nn.experts)."""

from tpext.nn.class_swap import derived_class, probe_copy, probe_disagrees, shell_copy  # noqa: F401
