"""Serving LLaVA with the guard on vLLM: plugin, guarded model classes, server and clients.

Submodules import vLLM only where they need it (:mod:`.model`, :mod:`.client`), so the
plugin entry point, the settings and the ``serve`` command stay importable without it.
"""
