"""Reading `host:port` lists, the form of SHAPSTREAM_KAFKA_BOOTSTRAP and ..._CASSANDRA_HOSTS."""


def parse_host_ports(value: str, default_port: int, what: str) -> list[tuple[str, int]]:
    """`"h1:1,[::1]:2,h3"` as (host, port) pairs; a missing port is `default_port`."""
    points: list[tuple[str, int]] = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = item.partition(":")
        if not host or not (port.isdigit() or port == ""):
            raise ValueError(f"cannot read {what} host {item!r}: use host:port or [ipv6]:port")
        points.append((host, int(port) if port else default_port))
    if not points:
        raise ValueError(f"no {what} hosts configured")
    return points
