"""Start one container: run by the process kubelet inside the pod's namespaces.

``ip netns exec <pod> unshare --mount --propagation private -- python container_init.py SPEC.json``

Runs as root in a private mount namespace, so nothing here is visible
outside the container's own process tree, and it all goes away with it:

1. the root: an overlay whose lower layer is this machine's ``/`` and whose
   upper layer is a tmpfs, so mount points (``/mlflow``,
   ``/etc/mlflow/auth``) and files (``/etc/hosts``) can be made without
   touching the host;
2. the volumes bound onto their ``mountPath`` (read-only where asked; Secret
   and ConfigMap volumes always), ``/proc`` and ``/dev``;
3. ``readOnlyRootFilesystem``: the overlay remounted read-only (the volumes
   keep their own mode);
4. chroot, ``workingDir``, supplementary groups, gid, uid, then exec.

Standard library only: it runs before the container's "image" is entered.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _mount(*args: str) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise OSError(f"mount {' '.join(args)}: {result.stderr.strip()}")


def _in_root(root: str, path: str, depth: int = 0) -> str:
    """``path`` as seen from inside ``root``: symlinks (``/var/run -> /run``) resolve within it, never to the host."""
    if depth > 40:
        raise OSError(f"too many levels of symbolic links in {path}")
    current = root
    parts = [p for p in path.split("/") if p and p != "."]
    for i, part in enumerate(parts):
        if part == "..":
            current = os.path.dirname(current) if current != root else root
            continue
        candidate = os.path.join(current, part)
        if os.path.islink(candidate):
            link = os.readlink(candidate)
            rest = "/".join(parts[i + 1:])
            if link.startswith("/"):
                return _in_root(root, link + "/" + rest, depth + 1)
            relative = os.path.relpath(current, root)
            return _in_root(root, ("" if relative == "." else relative) + "/" + link + "/" + rest, depth + 1)
        current = candidate
    return current


def main(spec_path: str) -> None:
    with open(spec_path) as fh:
        spec = json.load(fh)
    root, scratch = spec["root"], spec["scratch"]
    os.makedirs(root, exist_ok=True)
    os.makedirs(scratch, exist_ok=True)
    _mount("-t", "tmpfs", "-o", "mode=0755", "tmpfs", scratch)
    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    os.makedirs(upper)
    os.makedirs(work)
    _mount("-t", "overlay", "overlay", "-o", f"lowerdir=/,upperdir={upper},workdir={work}", root)

    def inside(path: str) -> str:
        return _in_root(root, path)

    for directory in spec.get("traversable", []):
        target = inside(directory)
        if os.path.isdir(target):
            os.chmod(target, os.stat(target).st_mode | 0o055)
    for path, text in (spec.get("files") or {}).items():
        target = inside(path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w") as fh:
            fh.write(text)
        os.chmod(target, 0o644)
    _mount("-t", "proc", "proc", inside("/proc"))
    _mount("--rbind", "/dev", inside("/dev"))
    for m in spec.get("mounts", []):
        target = inside(m["target"])
        if os.path.isdir(m["source"]):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.exists(target):
                open(target, "a").close()
        _mount("--bind", m["source"], target)
        if m.get("read_only"):
            _mount("-o", "remount,bind,ro", target)
    if spec.get("read_only_root"):
        _mount("-o", "remount,bind,ro", root)

    os.chroot(root)
    os.chdir(spec.get("working_dir") or "/")
    uid, gid = spec.get("uid"), spec.get("gid")
    if gid is None:
        gid = 0 if uid in (None, 0) else uid
    os.setgroups(sorted(set(spec.get("groups") or [])))
    os.setgid(gid)
    if uid is not None:
        os.setuid(uid)
    argv, env = spec["argv"], spec["env"]
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        print(f'exec: "{argv[0]}": {exc.strerror or exc}', file=sys.stderr, flush=True)
        os._exit(128)


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except OSError as exc:
        print(f"container init: {exc}", file=sys.stderr, flush=True)
        sys.exit(128)
