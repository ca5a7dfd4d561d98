"""Output of the application's scripts and commands made safe to show: in the module log, which an
operator reads in a terminal (`safekit-cloud log -f`), and in `status`."""

from __future__ import annotations

import re

# C0 controls but tab, DEL, and C1 controls: an escape sequence would recolour or clear the operator's
# terminal, a NUL or a carriage return hide what comes before it.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def shown(text: str) -> str:
    """`text` with its control characters written as escapes (\\x1b, \\x00)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
