"""This machine's pip settings, handed to an image build (``deploy/build-image.sh --host-pip``).

``python3 deploy/host_pip.py WORKDIR`` writes WORKDIR/pip.conf: what ``pip config list`` reports here (the
configuration files and the PIP_* variables, a variable winning over a file as it does for pip), less
``cert``, and with every local folder or file the settings name (find-links folders, file:// indexes,
constraint files) replaced by a URL on 127.0.0.1: the script serves WORKDIR/serve over HTTP during the build,
where each of those paths is a link, so that nothing of this machine's layout lands in the image. On stdout it
prints ``cert PATH`` (the CA bundle pip uses here: the build's ``ca`` secret) and ``serve PORT``.
"""
from __future__ import annotations

import ast
import configparser
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

PATH_KEYS = ("find-links", "index-url", "extra-index-url", "constraint")
ENV = ":env:"


def pip_config(python: str = sys.executable) -> dict[str, dict[str, str]]:
    """``pip config list`` as {section: {key: value}}; the PIP_* variables under the section ":env:"."""
    argv = [python, "-m", "pip", "config", "list"]  # this Python's own pip, nothing from input
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout  # noqa: S603
    sections: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        name, sep, value = line.partition("=")
        section, dot, key = name.rpartition(".")
        if sep and dot:
            sections.setdefault(section, {})[key] = ast.literal_eval(value)
    return sections


def merged(sections: dict[str, dict[str, str]]) -> tuple[dict[str, dict[str, str]], str | None]:
    """One pip.conf's sections, the variables folded into [global] (and out of every other section, since a
    variable wins over any file for pip), without ``cert``; and the CA bundle pip uses."""
    env = sections.get(ENV, {})
    cert = env.get("cert") or sections.get("global", {}).get("cert")
    out: dict[str, dict[str, str]] = {}
    for section, values in sections.items():
        if section != ENV:
            out[section] = {k: v for k, v in values.items() if k not in env and k != "cert"}
    out["global"] = {**out.get("global", {}), **{k: v for k, v in env.items() if k != "cert"}}
    return {s: v for s, v in out.items() if v}, cert


def local_root(item: str, key: str) -> tuple[Path, str] | None:
    """For an item naming a local folder or file: what to serve, and the item's path below it."""
    if item.startswith("file:"):
        path = Path(unquote(urlparse(item).path))
    elif item.startswith("/"):
        path = Path(item)
    else:
        return None
    if not path.exists():
        return None
    if key.endswith("index-url") and path.name == "simple":
        return path.parent, "/simple/"  # a PEP 503 tree links to its files beside simple/ (../../files/...)
    return path, "/" if path.is_dir() else ""


def serve_locally(sections: dict[str, dict[str, str]], serve: Path, base_url: str) -> dict[str, dict[str, str]]:
    """The sections with each local path replaced by its URL below base_url; serve/N links to the Nth path."""
    roots: list[Path] = []
    out: dict[str, dict[str, str]] = {}
    for section, values in sections.items():
        out[section] = dict(values)
        for key in PATH_KEYS:
            items = []
            for item in values.get(key, "").split():
                local = local_root(item, key)
                if local:
                    root, below = local
                    if root not in roots:
                        roots.append(root)
                        (serve / str(len(roots) - 1)).symlink_to(root)
                    item = f"{base_url}/{roots.index(root)}{below}"
                items.append(item)
            if items:
                out[section][key] = " ".join(items)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(workdir: str) -> None:
    work = Path(workdir)
    serve = work / "serve"
    serve.mkdir()
    port = free_port()
    sections, cert = merged(pip_config())
    conf = configparser.ConfigParser(interpolation=None)
    conf.read_dict(serve_locally(sections, serve, f"http://127.0.0.1:{port}"))
    with open(work / "pip.conf", "w") as f:
        conf.write(f)
    if cert:
        print("cert", cert)
    print("serve", port)


if __name__ == "__main__":
    main(sys.argv[1])
