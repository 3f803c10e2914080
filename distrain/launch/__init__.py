"""Launching distrain commands on a Ray cluster (`distrain submit`): the working directory (`workdir`), asking the
cluster (`probe`), the checks (`checks`), and the job itself (`job`). Deployment files live in the repository's
top-level `cluster/` folder."""

from distrain.launch.checks import Check, SubmitRefused
from distrain.launch.job import SubmitOptions, prepare, submit

__all__ = ["Check", "SubmitOptions", "SubmitRefused", "prepare", "submit"]
