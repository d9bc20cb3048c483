"""Hashing and token comparison without loading OpenSSL.

`hashlib` and `hmac` load the OpenSSL-backed `_hashlib`, which maps libcrypto: ~3.7 MiB of
daemon RSS for a few content hashes and one token comparison. CPython's own BLAKE2 and
SHA-256 modules and the interpreter's constant-time comparison do these jobs; they are what
hashlib and hmac fall back to on a Python built without OpenSSL, and give the same digests.
"""

from __future__ import annotations

try:
    from _blake2 import blake2b
except ImportError:  # an interpreter without its bundled BLAKE2 module
    from hashlib import blake2b

try:
    from _sha2 import sha256  # Python >= 3.12
except ImportError:
    try:
        from _sha256 import sha256  # Python 3.11
    except ImportError:  # an interpreter without its bundled SHA-256 module
        from hashlib import sha256

try:
    from _operator import _compare_digest as compare_digest
except ImportError:
    from hmac import compare_digest

__all__ = ["blake2b", "compare_digest", "sha256"]
