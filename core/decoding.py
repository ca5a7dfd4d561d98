"""What msgspec raises for bytes it cannot decode, in one place: DecodeError (ValidationError is one),
and UnicodeDecodeError for invalid UTF-8 in a string field, which is not a DecodeError."""

from __future__ import annotations

import msgspec

DECODE_ERRORS: tuple[type[Exception], ...] = (msgspec.DecodeError, UnicodeDecodeError)
