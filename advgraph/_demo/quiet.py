"""Keep third-party native log lines out of the demo's output.

TensorFlow writes lines such as ``I0000 ... port.cc:153] oneDNN custom operations
are on`` and ``Could not find cuda drivers`` from C++ straight to file descriptor 2
while it is imported, before ``TF_CPP_MIN_LOG_LEVEL`` is read, so no environment
variable hides them. :func:`native_stderr_silenced` points descriptor 2 at a
temporary file for the duration of a block (an import); what was written there is
replayed only when the block raises, so a failing import still explains itself.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterator

__all__ = ["native_stderr_silenced", "quiet_tensorflow_environment"]


def quiet_tensorflow_environment() -> None:
    """Environment settings that must precede ``import tensorflow`` (the user's own win).

    ``TF_CPP_MIN_LOG_LEVEL=2`` hides TensorFlow's C++ INFO and WARNING lines after
    its logging starts; errors are still printed.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Send what native code writes to stderr during the block to a temporary file.

    Example:
        >>> from advgraph._demo.quiet import native_stderr_silenced
        >>> with native_stderr_silenced():
        ...     _ = os.write(2, b"noise from C++\\n")
    """
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real descriptor (e.g. captured)
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), fd)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, fd)
            sink.seek(0)
            os.write(fd, sink.read())
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
