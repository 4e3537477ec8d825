"""compressed-tensors' module target syntax (class name, module name, 're:<regex>'). Pure."""

import re


def matches(module: str, cls: str, patterns: list) -> bool:
    """Whether a module (by name and class name) is named by any of the patterns."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], module):
                return True
        elif pattern in (cls, module):
            return True
    return False
