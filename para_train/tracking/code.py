"""What code a run ran (package versions, git revision), for the params and tags of its MLflow run."""

from __future__ import annotations

import os

PACKAGES = ("para-train", "torch", "deepspeed", "transformers", "peft", "diffusers", "mosaicml-streaming", "triton",
            "mlflow", "flash-attn")


def code_params(repo_root: str | os.PathLike) -> dict:
    """What code a run ran: package versions and, in a git checkout, its revision and whether it had
    uncommitted changes."""
    import importlib.metadata
    import subprocess

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    params: dict = {"versions": versions}
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(repo_root), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        params["git"] = {"revision": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "-uno"))}
    except (OSError, subprocess.SubprocessError):  # not a checkout (an installed package), or no git
        pass
    return params
