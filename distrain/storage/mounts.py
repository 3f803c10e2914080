"""Whether a local path is storage every node of a cluster sees (NFS, Lustre, a FUSE bucket), from /proc/mounts
and the user's word (DISTRAIN_SHARED_STORAGE): checkpoints on node-local disks cannot serve a multi-node run.

Usage:
    from distrain import storage
    storage.shared("/mnt/nfs/runs")        # True on an NFS mount
    storage.mount_of("/home/me")           # ('/', 'ext4')
"""

from __future__ import annotations

import os
from pathlib import Path

SHARED_FS_TYPES = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "glusterfs", "ceph", "fuse",
                   "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "fuse.mountpoint-s3", "9p", "wekafs", "efs")
# The user's word that paths under these folders (os.pathsep-separated) are the same storage on every node, for what
# /proc/mounts cannot tell: a bind mount of shared storage, a filesystem type not listed above, or several Ray nodes
# on one machine. Set it where the checks run: the submitting shell and the job (`--env`).
SHARED_STORAGE_ENV = "DISTRAIN_SHARED_STORAGE"


def mount_of(path: str) -> tuple[str, str]:
    """(mount point, filesystem type) of the mount holding `path`, from /proc/mounts."""
    best = ("/", "unknown")
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return best
    real = os.path.realpath(path)
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt, fstype = parts[1].replace("\\040", " "), parts[2]
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
            best = (mnt, fstype)
    return best


def declared_shared(path: str) -> bool:
    real = os.path.realpath(path)
    for prefix in filter(None, os.environ.get(SHARED_STORAGE_ENV, "").split(os.pathsep)):
        root = os.path.realpath(prefix)
        if real == root or real.startswith(root.rstrip("/") + "/"):
            return True
    return False


def shared(path: str) -> bool:
    """Whether a path is storage every node sees: a URL, a shared mount, or declared shared."""
    if "://" in str(path) and not str(path).startswith("file://"):
        return True
    path = str(path).removeprefix("file://")
    if declared_shared(path):
        return True
    fstype = mount_of(path)[1]
    return fstype in SHARED_FS_TYPES or fstype.startswith("fuse.") or fstype.startswith("nfs")


def node_local_message(key: str, path: str, nodes: int) -> str:
    """Why a node-local path cannot serve a run across `nodes` nodes (the one wording, for preflight and submit)."""
    mnt, fstype = mount_of(str(path).removeprefix("file://"))
    why = ("checkpoints written on one node are invisible to the others, so the run could neither resume nor "
           "recover from a failure" if key == "scaling.storage_path" else
           "workers on other nodes cannot read the shards")
    return (f"{key}={path} is on a node-local filesystem ({fstype} at {mnt}) but the run spans {nodes} nodes: "
            f"{why}. Use s3://, gs:// or a path on a shared mount (NFS, Lustre, a FUSE bucket); "
            f"{SHARED_STORAGE_ENV} declares paths shared that /proc/mounts cannot show.")
