"""Asking a Ray cluster before submitting to it: is it there, does it let us in (token authentication), which
nodes with which resources, and is its head node this machine.

Usage:
    from distrain.launch.probe import query_cluster, client_for
    cluster = query_cluster("http://127.0.0.1:8265")   # Cluster(nodes=[Node(ip, cpu, gpu, is_head)], local=True)
    client = client_for(cluster.address)               # a JobSubmissionClient, with the token when one is at hand

Token authentication: Ray's clients send the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token
when RAY_AUTH_MODE=token; `enable_token_auth_if_available` turns that mode on when a token is at hand and the user
chose none, as `ray`'s own CLI does. A cluster that refuses us is one clear line saying where the token comes from.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distrain.launch.checks import SubmitRefused

AUTH_HINT = ("the cluster requires Ray's token authentication and refused this request: export RAY_AUTH_TOKEN, "
             "point RAY_AUTH_TOKEN_PATH at the token file, or put it in ~/.ray/auth_token (KubeRay: `kubectl get "
             "secret <cluster name> -o jsonpath='{.data.auth_token}' | base64 -d`; `ray up` and `ray start` "
             "clusters: ~/.ray/auth_token of the head node)")


@dataclass


class Node:
    ip: str
    cpu: float
    gpu: float
    is_head: bool


@dataclass


class Cluster:
    address: str
    nodes: list[Node]
    local: bool  # the head node runs on this machine: local paths mean the same here and there

    def summary(self) -> dict[str, Any]:
        """The dict `distrain.train.run.preflight` takes (runtime.cluster_summary's keys)."""
        return {"nodes": len(self.nodes), "CPU": sum(n.cpu for n in self.nodes),
                "GPU": sum(n.gpu for n in self.nodes)}

    def describe(self) -> str:
        s = self.summary()
        where = "on this machine" if self.local else "remote"
        return f"{s['nodes']} node(s), {s['CPU']:g} CPUs, {s['GPU']:g} GPUs; {where}"


def enable_token_auth_if_available() -> bool:
    """Use Ray's token authentication when a token is at hand and the user has not chosen a mode, as `ray`'s
    own CLI does: clusters started with `ray start` require it (token in ~/.ray/auth_token)."""
    if "RAY_AUTH_MODE" in os.environ:
        return os.environ["RAY_AUTH_MODE"].lower() == "token"
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if not (os.environ.get("RAY_AUTH_TOKEN") or Path(token_file).is_file()):
        return False
    os.environ["RAY_AUTH_MODE"] = "token"
    from distrain import _compat

    _compat.reload_auth_mode()  # Ray caches its config at import: let it read the mode again
    return True


def refused_for_auth(e: BaseException) -> bool:
    """Whether an error from the dashboard means "not authenticated" (no token, or the wrong one)."""
    text = f"{type(e).__name__}: {e}".lower()
    return any(w in text for w in ("401", "403", "unauthorized", "unauthenticated", "authentication", "forbidden",
                                   "auth token", "invalid token"))


def is_local_address(address: str) -> bool:
    """Whether a host, IP or URL names this machine (loopback, or an address bound to a local interface)."""
    from urllib.parse import urlsplit

    if "://" not in address and address.count(":") > 1:
        host = address.strip("[]")  # a bare IPv6 address
    else:
        host = urlsplit(address if "://" in address else f"http://{address}").hostname or ""
    if host in ("localhost", ""):
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    for family, _, _, _, sockaddr in infos:
        ip = sockaddr[0]
        if ipaddress.ip_address(ip).is_loopback:
            return True
        # Binding succeeds only for addresses of this machine's interfaces.
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
            return True
    return False


UNREACHABLE = (". Is the cluster up, and its dashboard port reachable from here (`ray dashboard cluster/aws.yaml`, "
               "`kubectl port-forward svc/distrain-head-svc 8265:8265`)?")


def quiet_ray_loggers() -> None:
    """Ray's job SDK logs every ignore file it reads and each upload step at INFO, and warns once per default
    exclude that our excludes already cover: keep the submitter's output to the checks and the job's logs."""
    for name in ("ray._private.runtime_env.packaging", "ray.dashboard.modules.dashboard_sdk",
                 "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)


def client_for(address: str):
    from ray.job_submission import JobSubmissionClient

    enable_token_auth_if_available()
    quiet_ray_loggers()
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # connection refused, authentication, version: all mean "cannot submit"
        if refused_for_auth(e):
            raise SubmitRefused(f"{address}: {AUTH_HINT}") from None
        raise SubmitRefused(f"cannot reach the Ray job API at {address}: {type(e).__name__}: {e}{UNREACHABLE}"
                            ) from None


def query_cluster(address: str) -> Cluster:
    """Alive nodes and their resources, through the dashboard's state API (no driver connection needed)."""
    from ray.util.state import list_nodes

    enable_token_auth_if_available()
    try:
        nodes = list_nodes(address=address, detail=True, raise_on_missing_output=False)
    except Exception as e:  # any failure here means the cluster cannot be asked
        if refused_for_auth(e):
            raise SubmitRefused(f"{address}: {AUTH_HINT}") from None
        first = str(e).strip().split(". ")[0]
        raise SubmitRefused(f"cannot list the nodes of {address}: {type(e).__name__}: {first}{UNREACHABLE}") from None
    alive = [Node(ip=n.node_ip, cpu=float((n.resources_total or {}).get("CPU", 0)),
                  gpu=float((n.resources_total or {}).get("GPU", 0)), is_head=bool(n.is_head_node))
             for n in nodes if n.state == "ALIVE"]
    # "On this machine" is decided by where the head node runs (where the job's driver reads paths), not by the
    # dashboard address: `ray dashboard` and `kubectl port-forward` make remote clusters answer on 127.0.0.1.
    heads = [n for n in alive if n.is_head] or alive[:1]
    return Cluster(address=address, nodes=alive, local=bool(heads) and all(is_local_address(n.ip) for n in heads))
