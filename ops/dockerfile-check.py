#!/usr/bin/env python3
"""Runs the build stage of the Dockerfile without a Docker engine.

It reads the Dockerfile, takes the stage that builds the binary, and carries
out its COPY (honouring .dockerignore), WORKDIR, ENV and RUN instructions in a
scratch directory, with the stage's absolute paths mapped into that directory.
Then it checks that everything the final stage copies from the build stage
exists, and that the built binary runs. It cannot check the base images
themselves (no registry is reached); it does check that the project's own
build steps, files and paths in the Dockerfile are right.

Usage: ops/dockerfile-check.py [--keep]
"""
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def instructions(path):
    """(keyword, argument) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    with open(path) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not buf and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.endswith("\\"):
                buf += line[:-1] + " "
                continue
            buf += line
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def ignore_rules():
    rules = []
    path = os.path.join(ROOT, ".dockerignore")
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line and not line.startswith("#"):
                rules.append((line.startswith("!"), line.lstrip("!").strip("/")))
    return rules


def ignored(rel, rules):
    """Docker's rule: the last pattern that matches the path or a parent decides."""
    verdict = False
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for negate, pattern in rules:
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes):
            verdict = not negate
    return verdict


def copy_into(src_rel, dest, rules):
    src = os.path.join(ROOT, src_rel)
    if not os.path.exists(src):
        sys.exit(f"dockerfile-check: COPY source {src_rel} does not exist")
    if os.path.isdir(src):
        for dirpath, _, files in os.walk(src):
            for name in files:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, ROOT)
                if ignored(rel, rules):
                    continue
                target = os.path.join(dest, os.path.relpath(full, src))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copy2(full, target)
    else:
        if ignored(src_rel, rules):
            sys.exit(f"dockerfile-check: COPY {src_rel} is excluded by .dockerignore")
        target = os.path.join(dest, os.path.basename(src)) if dest.endswith("/") else dest
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(src, target)


def main():
    keep = "--keep" in sys.argv
    steps = instructions(os.path.join(ROOT, "Dockerfile"))
    stages = [i for i, (k, _) in enumerate(steps) if k == "FROM"]
    build_name = steps[stages[0]][1].split()[-1]
    build = steps[stages[0] + 1 : stages[1]] if len(stages) > 1 else steps[stages[0] + 1 :]
    final = steps[stages[-1] + 1 :]
    scratch = tempfile.mkdtemp(prefix="pns-docker-")
    rules = ignore_rules()
    env = dict(os.environ)
    workdir = "/"

    def mapped(path):
        return os.path.join(scratch, path.lstrip("/"))

    def map_abs(text):
        # Absolute paths of the image (/src, /out, …) into the scratch dir.
        return re.sub(r"(?<![\w.~-])/(src|out)\b", lambda m: mapped("/" + m.group(1)), text)

    try:
        for keyword, arg in build:
            if keyword == "WORKDIR":
                workdir = arg
                os.makedirs(mapped(workdir), exist_ok=True)
            elif keyword == "ENV":
                for pair in shlex.split(arg):
                    k, _, v = pair.partition("=")
                    env[k] = v
            elif keyword == "COPY":
                parts = shlex.split(arg)
                parts = [p for p in parts if not p.startswith("--")]
                *sources, dest = parts
                dest_abs = dest if dest.startswith("/") else os.path.join(workdir, dest)
                dest_path = mapped(dest_abs) + ("/" if dest.endswith("/") or len(sources) > 1 else "")
                for s in sources:
                    if len(sources) > 1 or dest.endswith("/"):
                        copy_into(s, os.path.join(dest_path, os.path.basename(s)) if os.path.isdir(os.path.join(ROOT, s)) else dest_path, rules)
                    else:
                        copy_into(s, dest_path, rules)
            elif keyword == "RUN":
                print(f"dockerfile-check: RUN {arg[:100]}…", flush=True)
                r = subprocess.run(["sh", "-ec", map_abs(arg)], cwd=mapped(workdir), env=env)
                if r.returncode != 0:
                    sys.exit(f"dockerfile-check: RUN failed with exit code {r.returncode}: {arg}")
        for keyword, arg in final:
            if keyword == "COPY" and f"--from={build_name}" in arg:
                src = [p for p in shlex.split(arg) if not p.startswith("--")][0]
                if not os.path.exists(mapped(src)):
                    sys.exit(f"dockerfile-check: the final stage copies {src}, which the build stage did not make")
        binary = mapped("/out/pns")
        r = subprocess.run([binary, "--help"], capture_output=True, text=True)
        if r.returncode != 0 or "serve" not in r.stdout:
            sys.exit("dockerfile-check: the built binary does not run")
        print(f"dockerfile-check: ok, build stage made /out/pns ({os.path.getsize(binary) // 1024} KiB) and /out/data")
    finally:
        if keep:
            print(f"dockerfile-check: kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
