"""distrain's own lines on the console: one prefix, secrets redacted, straight to the stream.

Usage:
    from distrain.console import say, warn
    say("epoch 1/3: train_loss 0.41 ...")        # [distrain] epoch 1/3: ...
    warn("W&B could not start ...")              # [distrain] warning: ... (stderr)

In a Train worker the lines do not go to the worker's stream but to the driver (`set_sink`, train/control.py): the
driver prints them, so a user sees distrain's lines without Ray's per-worker prefixes and whether or not Ray's own
stream is shown (`-v`).

Not print(): Ray Train patches `print` in its workers (it logs *and* echoes, so lines would show twice), and once
wandb has wrapped a stream it emits each line twice too; a direct write shows a line once. Every line goes through
the one redaction (distrain/redact.py), so a URL with credentials never reaches a terminal or a job log.
"""

from __future__ import annotations

import sys

from distrain.redact import redact_text

PREFIX = "[distrain] "
_SINK = None  # callable(text, warning: True, False or None = progress) taking every line instead (Train workers)


def set_sink(sink) -> None:
    """Send this process's lines to `sink(text, warning)` from now on (None: back to the streams)."""
    global _SINK
    _SINK = sink


def say(message: str, stream=None) -> None:
    if _SINK is not None and stream is None:
        try:
            _SINK(redact_text(str(message)), False)
            return
        except Exception:  # the driver is gone: fall back to this process's stream
            pass
    stream = stream or sys.stdout
    try:
        stream.write(PREFIX + redact_text(str(message)) + "\n")
        stream.flush()
    except (BrokenPipeError, ValueError):  # a closed pipe or stream: nothing to tell anyone
        pass


def progress(message: str) -> None:
    """A progress line (step, loss, lr, images/s): on a terminal the driver rewrites it in place; elsewhere (job
    logs, files) it is an ordinary line."""
    if _SINK is not None:
        try:
            _SINK(redact_text(str(message)), None)
            return
        except Exception:
            pass
    say(message)


def warn(message: str) -> None:
    if _SINK is not None:
        try:
            _SINK(redact_text(f"warning: {message}"), True)
            return
        except Exception:
            pass
    say(f"warning: {message}", sys.stderr)
