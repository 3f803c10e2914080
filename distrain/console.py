"""distrain's own lines on the console: one prefix, secrets redacted, straight to the stream.

Usage:
    from distrain.console import say, warn
    say("epoch 1/3: train_loss 0.41 ...")        # [distrain] epoch 1/3: ...
    warn("W&B could not start ...")              # [distrain] warning: ... (stderr)

Not print(): Ray Train patches `print` in its workers (it logs *and* echoes, so lines would show twice), and once
wandb has wrapped a stream it emits each line twice too; a direct write shows a line once. Every line goes through
the one redaction (distrain/redact.py), so a URL with credentials never reaches a terminal or a job log.
"""

from __future__ import annotations

import sys

from distrain.redact import redact_text

PREFIX = "[distrain] "


def say(message: str, stream=None) -> None:
    stream = stream or sys.stdout
    try:
        stream.write(PREFIX + redact_text(str(message)) + "\n")
        stream.flush()
    except (BrokenPipeError, ValueError):  # a closed pipe or stream: nothing to tell anyone
        pass


def warn(message: str) -> None:
    say(f"warning: {message}", sys.stderr)
