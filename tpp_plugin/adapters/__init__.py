"""Thin glue between :mod:`tpp_plugin.functional` and each SNN framework (imported lazily)."""
