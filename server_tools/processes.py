"""The local tritonserver's processes, from /proc: find the server by its gRPC port, its process tree's memory."""

from __future__ import annotations

from pathlib import Path


def process_cmdlines() -> list[tuple[int, list[bytes]]]:
    """(pid, argv) of every process readable in /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            out.append((int(entry.name), (entry / "cmdline").read_bytes().split(b"\0")))
        except OSError:
            continue
    return out


def find_server_pid(grpc_port: int) -> int | None:
    """The local tritonserver whose command line names this gRPC port (or the only one, if it names none)."""
    candidates = []
    for pid, argv in process_cmdlines():
        if argv and argv[0].endswith(b"tritonserver"):
            args = [a.decode(errors="replace") for a in argv]
            ports = [a.split("=", 1)[1] for a in args if a.startswith("--grpc-port=")]
            candidates.append((pid, ports))
    exact = [pid for pid, ports in candidates if ports == [str(grpc_port)]]
    if exact:
        return exact[0]
    default = [pid for pid, ports in candidates if not ports and grpc_port == 8001]
    return default[0] if len(default) == 1 else None


def process_tree(pid: int) -> list[dict]:
    """pid and its descendants: [{pid, name, rss_mb, threads}] from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [pid], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        tree += children
        frontier = children
    out = []
    for p in tree:
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        out.append(
            {
                "pid": p,
                "name": fields["Name"].strip(),
                "rss_mb": int(fields.get("VmRSS", "0 kB").split()[0]) / 1024,
                "threads": int(fields.get("Threads", "0")),
            }
        )
    return out
