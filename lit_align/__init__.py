"""lit-align: alignment objectives as small Lightning modules on one shared backbone."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes' CPU backend warns at import that an optional kernel cannot be downloaded; the
# fallback it then uses is correct, and the warning only misleads users here.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
