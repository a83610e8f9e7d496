"""Bytes that really crossed a network interface, read from the kernel's counters.

``/sys/class/net/<interface>/statistics/{tx,rx}_bytes`` count every byte the interface sent and
received, headers included (Ethernet, IP, TCP: about 4-5% on top of the payload at a 1500-byte MTU,
plus the acknowledgements of the other direction). In the emulated cluster every node is a network
namespace whose only link to the others is ``eth0`` (``local/emulate_cluster.sh``; ``ip netns exec``
mounts the namespace's own sysfs), so the counters there are the traffic of that node's ranks and
nothing else's (one rank's when a node runs one, as in the comparisons): an instrument outside the
project's own accounting, set beside its modelled bytes.
"""

from __future__ import annotations

import os
from pathlib import Path


def training_interface() -> str | None:
    """The interface gloo uses (``GLOO_SOCKET_IFNAME``) when it is a real link, else None (loopback
    counts every process of the machine, so it measures nothing of this run's)."""
    name = os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0].strip()
    if not name or name == "lo" or not (Path("/sys/class/net") / name).is_dir():
        return None
    return name


def interface_bytes(name: str) -> tuple[int, int]:
    """(bytes sent, bytes received) so far on interface ``name``."""
    base = Path("/sys/class/net") / name / "statistics"
    try:
        return int((base / "tx_bytes").read_text()), int((base / "rx_bytes").read_text())
    except (OSError, ValueError) as e:
        raise RuntimeError(f"cannot read the byte counters of interface '{name}' in {base}: {e}") from e
