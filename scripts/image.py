#!/usr/bin/env python3
"""`make image`: the project's container images, built without a daemon.

Writes docker-archive tarballs (what `docker save` writes, and what
`ctr images import` reads) into $SALESLAYER_IMAGES, else
${CARGO_TARGET_DIR:-target}/images:

  saleslayer-operator.tar  the operator's image: exactly what the Dockerfile's
                           final stage gives, read from the Dockerfile itself
  saleslayer-pause.tar     the node's sandbox image (tests/testenv/pause)
  saleslayer-workload.tar  the examples' workload: Debian's busybox-static,
                           plus examples/catalog-sync when that crate exists

and images.json, naming each archive's image reference.

The Dockerfile stays the source of truth for the operator's image. Its final
stage may hold only FROM (the distroless base reproduced here), COPY --from
of the build stage, USER, EXPOSE, ENTRYPOINT and CMD; anything else stops this
script with a message, so the two cannot drift silently. The base is rebuilt
from this Debian 12 host the way distroless cc-debian12 is made from Debian 12:
the binaries' shared libraries (as `ldd` lists them), the CA bundle,
/etc/passwd and /etc/group with root and nonroot (65532), /tmp, and the
environment distroless sets. Nothing else. The e2e test `image` compares the
archive with the Dockerfile again.

Archives are reproducible: entries sorted, owned by root, dated 1970.
Python's standard library only.
"""

import hashlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = "gcr.io/distroless/cc-debian12"
# What distroless' cc-debian12 image sets (its config as published).
BASE_ENV = [
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
]
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
PASSWD = (
    "root:x:0:0:root:/root:/sbin/nologin\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
    "nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
)
GROUP = "root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n"
FINAL_STAGE_INSTRUCTIONS = {"FROM", "COPY", "USER", "EXPOSE", "ENTRYPOINT", "CMD"}


class ImageError(Exception):
    """A reason the images cannot be built, worded for whoever runs make."""


def cargo_version():
    with open(os.path.join(ROOT, "Cargo.toml"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("[workspace.package]", 1)[-1]
    match = re.search(r'^version\s*=\s*"([^"]+)"', section, re.M)
    if not match:
        raise ImageError("no version in Cargo.toml's [workspace.package]")
    return match.group(1)


def target_dir():
    return os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")


def testenv_bin():
    return os.environ.get("TESTENV_BIN") or os.path.join(ROOT, "target", "testenv", "bin")


# ---------------------------------------------------------------- Dockerfile


def dockerfile_stages(path):
    """[(from, name, [(instruction, args)])] with continuation lines joined."""
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    lines, current = [], ""
    for line in raw.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current:
        lines.append(current)
    stages = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append((words[0], name, []))
        elif not stages:
            raise ImageError(f"{path}: {instruction} before the first FROM")
        else:
            stages[-1][2].append((instruction, args.strip()))
    if not stages:
        raise ImageError(f"{path}: no FROM")
    return stages


def exec_form(args, what):
    try:
        value = json.loads(args)
    except json.JSONDecodeError as error:
        raise ImageError(f"Dockerfile {what} must be in exec form (a JSON list): {error}")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImageError(f"Dockerfile {what} must be a JSON list of strings")
    return value


def operator_spec(dockerfile):
    """What the Dockerfile's final stage says the operator's image holds."""
    stages = dockerfile_stages(dockerfile)
    base, _, instructions = stages[-1]
    build_stages = {name: body for _, name, body in stages[:-1] if name}
    if base.split("@")[0].split(":")[0] != BASE:
        raise ImageError(
            f"the Dockerfile's final stage is FROM {base}; scripts/image.py reproduces "
            f"only {BASE} (glibc, libgcc, CA certificates, nonroot): teach it the new base"
        )
    spec = {"user": None, "entrypoint": None, "cmd": None, "expose": [], "copies": []}
    for instruction, args in instructions:
        if instruction not in FINAL_STAGE_INSTRUCTIONS:
            raise ImageError(
                f"the Dockerfile's final stage has {instruction} {args}; scripts/image.py "
                f"reproduces only {sorted(FINAL_STAGE_INSTRUCTIONS)}: teach it {instruction}"
            )
        if instruction == "USER":
            spec["user"] = args
        elif instruction == "ENTRYPOINT":
            spec["entrypoint"] = exec_form(args, "ENTRYPOINT")
        elif instruction == "CMD":
            spec["cmd"] = exec_form(args, "CMD")
        elif instruction == "EXPOSE":
            for port in args.split():
                spec["expose"].append(port if "/" in port else f"{port}/tcp")
        elif instruction == "COPY":
            words = shlex.split(args)
            flags = [w for w in words if w.startswith("--")]
            paths = [w for w in words if not w.startswith("--")]
            stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
            if stage not in build_stages or len(flags) != 1 or len(paths) != 2:
                raise ImageError(
                    f"Dockerfile COPY {args}: scripts/image.py reproduces only "
                    "`COPY --from=<build stage> /out/<binary> <destination>`"
                )
            source, destination = paths
            spec["copies"].append((binary_of(source, build_stages[stage]), destination))
    if spec["user"] is None or spec["entrypoint"] is None:
        raise ImageError("the Dockerfile's final stage needs USER and ENTRYPOINT")
    return spec


def binary_of(source, build_stage):
    """The release binary the build stage installs as `source`."""
    script = " ".join(args for instruction, args in build_stage if instruction == "RUN")
    match = re.search(r"install -D target/release/(\S+) " + re.escape(source) + r"(\s|$)", script)
    if not match:
        raise ImageError(
            f"the Dockerfile's build stage does not `install -D target/release/<binary> {source}`"
        )
    return match.group(1)


# ---------------------------------------------------------------- archives


class Layer:
    """A deterministic filesystem layer (a tar in memory)."""

    def __init__(self):
        self.entries = {}

    def directory(self, path, mode=0o755, owner=0):
        self.parents(path)
        self.entries[path.strip("/")] = ("dir", mode, owner)

    def parents(self, path):
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.entries.setdefault("/".join(parts[:i]), ("dir", 0o755, 0))

    def file(self, path, data, mode=0o644):
        self.parents(path)
        self.entries[path.strip("/")] = ("file", mode, data)

    def host_file(self, path, source=None, mode=None):
        source = source or path
        real = os.path.realpath(source)
        with open(real, "rb") as f:
            data = f.read()
        self.file(path, data, mode if mode is not None else os.stat(real).st_mode & 0o777)

    def symlink(self, path, target):
        self.parents(path)
        self.entries[path.strip("/")] = ("symlink", 0o777, target)

    def tar(self):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(self.entries):
                kind, mode, data = self.entries[name]
                info = tarfile.TarInfo(name)
                info.mode, info.mtime, info.uid, info.gid = mode, 0, 0, 0
                info.uname = info.gname = "root"
                if kind == "dir":
                    info.type = tarfile.DIRTYPE
                    info.uid = info.gid = data
                    info.uname = info.gname = "nonroot" if data == 65532 else "root"
                    tar.addfile(info)
                elif kind == "symlink":
                    info.type, info.linkname = tarfile.SYMTYPE, data
                    tar.addfile(info)
                else:
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return out.getvalue()


def shared_libraries(binary):
    """The paths `ldd` resolves for a dynamically linked binary (none if static)."""
    result = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if result.returncode != 0:
        if "not a dynamic executable" in result.stdout + result.stderr:
            return []
        raise ImageError(f"ldd {binary}: {result.stderr.strip()}")
    paths = []
    for line in result.stdout.splitlines():
        line = line.strip()
        if "not found" in line:
            raise ImageError(f"{binary} needs a library this host lacks: {line}")
        match = re.match(r"(?:\S+ => )?(/\S+) \(0x", line)
        if match:
            paths.append(match.group(1))
    return paths


def base_layer(layer, binaries):
    """The distroless cc-debian12 part of an image, from this Debian 12 host."""
    layer.directory("tmp", 0o1777)
    layer.directory("home/nonroot", 0o700, owner=65532)
    layer.file("etc/passwd", PASSWD.encode())
    layer.file("etc/group", GROUP.encode())
    if not os.path.isfile(CA_BUNDLE):
        raise ImageError(f"{CA_BUNDLE} is missing: apt-get install ca-certificates")
    layer.host_file(CA_BUNDLE)
    for binary in binaries:
        for library in shared_libraries(binary):
            layer.host_file(library)


def write_archive(path, reference, layer, config):
    layer_tar = layer.tar()
    diff_id = hashlib.sha256(layer_tar).hexdigest()
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "scripts/image.py"}],
    }
    config_bytes = json.dumps(image_config, sort_keys=True, separators=(",", ":")).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": [reference], "Layers": [f"{diff_id}/layer.tar"]}]
    archive = Layer()
    archive.file(config_name, config_bytes)
    archive.file(f"{diff_id}/layer.tar", layer_tar)
    archive.file("manifest.json", json.dumps(manifest, separators=(",", ":")).encode())
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(archive.tar())
    os.replace(tmp, path)
    return config_name[:-5]


def release_binary(name):
    path = os.path.join(target_dir(), "release", name)
    if not os.path.isfile(path):
        raise ImageError(
            f"{path} is missing: `cargo build --release --bin {name}` first (make image does)"
        )
    return path


def operator_image(out, version):
    spec = operator_spec(os.path.join(ROOT, "Dockerfile"))
    binaries = [(release_binary(name), destination) for name, destination in spec["copies"]]
    layer = Layer()
    base_layer(layer, [binary for binary, _ in binaries])
    for binary, destination in binaries:
        layer.host_file(destination, binary, 0o755)
    config = {
        "User": spec["user"],
        "Env": BASE_ENV,
        "Entrypoint": spec["entrypoint"],
        # The :nonroot base's working directory, which USER does not change.
        "WorkingDir": "/home/nonroot",
    }
    if spec["cmd"] is not None:
        config["Cmd"] = spec["cmd"]
    if spec["expose"]:
        config["ExposedPorts"] = {port: {} for port in spec["expose"]}
    reference = f"localhost/saleslayer-operator:{version}"
    write_archive(os.path.join(out, "saleslayer-operator.tar"), reference, layer, config)
    return reference


def pause_image(out):
    pause = os.path.join(testenv_bin(), "pause")
    if not os.path.isfile(pause):
        raise ImageError(f"{pause} is missing: run `make testenv-node` first")
    layer = Layer()
    layer.host_file("pause", pause, 0o755)
    reference = "localhost/saleslayer-pause:1"
    config = {"User": "65535:65535", "Entrypoint": ["/pause"], "WorkingDir": "/"}
    write_archive(os.path.join(out, "saleslayer-pause.tar"), reference, layer, config)
    return reference


def workload_image(out, version):
    busybox = "/bin/busybox"
    if not os.path.isfile(busybox) or shared_libraries(busybox):
        raise ImageError(f"{busybox} (static) is missing: apt-get install busybox-static")
    layer = Layer()
    layer.host_file("bin/busybox", busybox, 0o755)
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        if applet != "busybox":
            layer.symlink(f"bin/{applet}", "busybox")
    binaries = []
    if os.path.isfile(os.path.join(ROOT, "examples", "catalog-sync", "Cargo.toml")):
        path = os.path.join(target_dir(), "release", "catalog-sync")
        if not os.path.isfile(path):
            raise ImageError(
                f"examples/catalog-sync exists but {path} is not built: "
                "`cargo build --release -p catalog-sync` (make image does)"
            )
        binaries.append(path)
    base_layer(layer, binaries)
    for binary in binaries:
        layer.host_file("usr/local/bin/" + os.path.basename(binary), binary, 0o755)
    reference = f"localhost/saleslayer-workload:{version}"
    config = {
        "User": "65532:65532",
        "Env": ["PATH=/usr/local/bin:/bin", "SSL_CERT_FILE=" + CA_BUNDLE],
        "Cmd": ["/bin/sh"],
        "WorkingDir": "/",
    }
    write_archive(os.path.join(out, "saleslayer-workload.tar"), reference, layer, config)
    return reference


def main():
    out = os.environ.get("SALESLAYER_IMAGES") or os.path.join(target_dir(), "images")
    os.makedirs(out, exist_ok=True)
    version = cargo_version()
    images = {
        "operator": {"file": "saleslayer-operator.tar", "reference": operator_image(out, version)},
        "pause": {"file": "saleslayer-pause.tar", "reference": pause_image(out)},
        "workload": {"file": "saleslayer-workload.tar", "reference": workload_image(out, version)},
    }
    with open(os.path.join(out, "images.json"), "w", encoding="utf-8") as f:
        json.dump(images, f, indent=2, sort_keys=True)
        f.write("\n")
    for image in images.values():
        size = os.path.getsize(os.path.join(out, image["file"])) / 1e6
        print(f"image: {image['reference']} -> {os.path.join(out, image['file'])} ({size:.1f} MB)")


if __name__ == "__main__":
    try:
        main()
    except ImageError as error:
        print(f"image: {error}", file=sys.stderr)
        sys.exit(1)
