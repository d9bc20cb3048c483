"""Hashing and token comparison without loading OpenSSL.

`hashlib` and `hmac` load the OpenSSL-backed `_hashlib`, which maps libcrypto: ~3.7 MiB of
daemon RSS for one content hash and one token comparison. CPython's own BLAKE2 module and
the interpreter's constant-time comparison do both jobs; they are what hashlib and hmac
fall back to on a Python built without OpenSSL.
"""

from __future__ import annotations

try:
    from _blake2 import blake2b
except ImportError:  # an interpreter without its bundled BLAKE2 module
    from hashlib import blake2b

try:
    from _operator import _compare_digest as compare_digest
except ImportError:
    from hmac import compare_digest

__all__ = ["blake2b", "compare_digest"]
