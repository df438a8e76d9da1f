"""The model lifecycle end to end, as a release engineer and a device run it.

    e2e_deploy.py TERN_BINARY
    e2e_deploy.py TERN_BINARY --prepare OUT   (the repository at each step, for the
                                               bindings' tests; see prepare())

A publisher makes keys, an update repository and signed bundles of magika (the embedded
model) with `tern bundle`; a local HTTP server serves the repository's static files; a
device (`tern store`) pulls, verifies and golden-checks version 1 and activates it; version
2 arrives, is staged, shadowed and promoted by its rollout; the root keys are rotated and
the device follows; a bad version 3 (a "retrained" model that always answers one class,
made here with onnx) arrives and is rolled back by its rollout on its own and quarantined,
version 2 still serving. Every step is checked from the commands' JSON; the last line is
one summary: `deploy-e2e: N steps passed, M failed`.
"""

import functools
import http.server
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading

import numpy as np
import onnx
from onnx import numpy_helper

from e2e_steps import check, finish

TERN = sys.argv[1]
ROOT = pathlib.Path(__file__).resolve().parent.parent
MAGIKA = ROOT / "models" / "magika" / "model.onnx"


def tern(*args, ok=True):
    """Runs `tern --json ARGS` and returns its JSON document."""
    out = subprocess.run([TERN, *map(str, args), "--json"], capture_output=True, text=True)
    if ok and out.returncode != 0:
        raise RuntimeError(f"tern {' '.join(map(str, args))} failed: {out.stdout} {out.stderr}")
    return json.loads(out.stdout) if out.stdout.strip() else {}


def biased_magika(path):
    """Magika with the least likely class's logit raised by 1000: always that class."""
    m = onnx.load(str(MAGIKA))
    bias = next(t for t in m.graph.initializer if t.name.endswith("Dense_1/Reshape:0"))
    b = numpy_helper.to_array(bias).copy()
    b.reshape(-1)[int(np.argmin(b.reshape(-1)))] += 1000.0
    bias.CopyFrom(numpy_helper.from_array(b, bias.name))
    onnx.save(m, str(path))


class Quiet(http.server.SimpleHTTPRequestHandler):
    """The static file server, without a log line per request."""

    def log_message(self, *args):
        pass


def serve(directory):
    """Serves `directory` over HTTP on a free local port; returns the server and its URL."""
    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


# Version 2's own rollout policy, in its signed manifest: shadow half the requests, decide
# after 10 compared runs, promote after 20. (Latency is not judged here: a few timed runs
# on a busy CI machine bound nothing; the library's tests cover it with given durations.)
SHADOW_POLICY = ["--rollout-stage", "shadow", "--rollout-share", "0.5", "--rollout-min-requests",
                 "10", "--rollout-promote-after", "20", "--rollout-max-p95-ratio", "1000"]


class Publisher:
    """The release side: keys, the repository, bundles, through `tern bundle`."""

    def __init__(self, t):
        self.t = t
        for k in ["release", "root", "root2", "targets", "snapshot", "timestamp", "timestamp2"]:
            tern("bundle", "keygen", "--out", t / f"{k}.key")
        self.repo = t / "repo"
        self.timestamp = "timestamp"
        tern("bundle", "init-repo", self.repo, *self.roles("root", "timestamp"),
             "--sign", t / "root.key")

    def roles(self, root, timestamp):
        t = self.t
        return ["--root-pub", t / f"{root}.key.pub", "--targets-pub", t / "targets.key.pub",
                "--snapshot-pub", t / "snapshot.key.pub",
                "--timestamp-pub", t / f"{timestamp}.key.pub"]

    def publish(self, version, bad=False, rollout=()):
        """Builds magika `version` (the biased model when `bad`, carrying the `rollout`
        policy flags in its signed manifest), signs and publishes it."""
        t = self.t
        model = MAGIKA
        if bad:
            model = t / "bad.onnx"
            biased_magika(model)
        out = t / f"magika-{version}.tern"
        tern("bundle", "create", model, "--name", "magika", "--version", version,
             "--out", out, "--random-samples", 2, "--key", t / "release.key", *rollout)
        tern("bundle", "publish", self.repo, out, "--targets-key", t / "targets.key",
             "--snapshot-key", t / "snapshot.key", "--timestamp-key", t / f"{self.timestamp}.key")

    def rotate(self):
        """New root and timestamp keys, signed by the old root key and the new one."""
        t = self.t
        tern("bundle", "rotate-root", self.repo, *self.roles("root2", "timestamp2"),
             "--sign", t / "root.key", "--sign", t / "root2.key")
        self.timestamp = "timestamp2"


def prepare(out):
    """The repository at each step of the scenario, for the bindings' tests: out/steps/1
    (version 1), 2 (version 2), 3 (keys rotated, bad version 3), with out/release.key.pub
    (the key a store trusts), out/stranger.key.pub (one that signed nothing) and
    out/root.json (the root a device ships with)."""
    out = pathlib.Path(out)
    shutil.rmtree(out, ignore_errors=True)
    (out / "steps").mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        p = Publisher(pathlib.Path(tmp))
        shutil.copy(p.t / "release.key.pub", out / "release.key.pub")
        # A valid key that signed no bundle.
        shutil.copy(p.t / "targets.key.pub", out / "stranger.key.pub")
        shutil.copy(p.repo / "1.root.json", out / "root.json")
        for step in [1, 2, 3]:
            if step == 3:
                p.rotate()
            p.publish(step, bad=step == 3, rollout=SHADOW_POLICY if step == 2 else ())
            shutil.copytree(p.repo, out / "steps" / str(step))


def main():
    with tempfile.TemporaryDirectory() as tmp:
        t = pathlib.Path(tmp)
        publisher = Publisher(t)
        repo, device = publisher.repo, t / "device"
        server, url = serve(repo)
        store = ["store", "--dir", device, "--trust", t / "release.key.pub"]
        update = [*store, "update", "magika", "--repo", url, "--root", repo / "1.root.json",
                  "--backend", "cpu"]
        try:
            print("deploy-e2e: publish 1, the device pulls and activates it")
            publisher.publish(1)
            first_timestamp = (repo / "timestamp.json").read_bytes()
            doc = tern(*update, "--then", "activate")
            check("version 1 installed over HTTP", doc["update"].get("version") == 1, doc)
            check("its golden samples passed on the device",
                  doc["update"]["golden"]["samples"] == 2, doc)
            check("nothing newer on a second pull",
                  tern(*update)["update"] == {"outcome": "up_to_date", "newest": 1})

            print("deploy-e2e: publish 2; staged, shadowed, promoted")
            publisher.publish(2, rollout=SHADOW_POLICY)
            doc = tern(*update, "--then", "stage")
            check("version 2 staged", doc["models"]["magika"].get("candidate") == 2, doc)
            # The device's own policy (overriding any in the bundle).
            rollout = lambda share, requests, promote_after: tern(  # noqa: E731
                *store, "rollout", "magika", "--stage", "shadow", "--share", share,
                "--requests", requests, "--min-requests", 10, "--promote-after", promote_after,
                "--max-p95-ratio", 1000, "--backend", "cpu")
            # No policy from the device: version 2's signed one applies.
            doc = tern(*store, "rollout", "magika", "--requests", 60, "--backend", "cpu")
            check("the bundle's own policy ran", doc["rollout"]["served"] == {"active v1": 40, "candidate v2": 20},
                  doc["rollout"])
            check("shadowed version 2 agreed and was promoted",
                  doc["rollout"]["verdict"]["verdict"] == "promote", doc["rollout"])
            m = doc["models"]["magika"]
            check("2 active, 1 kept as previous", (m["active"], m.get("previous")) == (2, 1), m)

            print("deploy-e2e: root keys rotated (new root and timestamp keys)")
            publisher.rotate()
            publisher.publish(3, bad=True)
            doc = tern(*update, "--then", "stage")
            check("the device walked to root 2", doc.get("root_version") == 2, doc)
            check("bad version 3 passed its own golden check and was staged",
                  doc["models"]["magika"].get("candidate") == 3, doc)

            print("deploy-e2e: the bad version is rolled back by its rollout")
            doc = rollout(1.0, 30, 1000)
            verdict = doc["rollout"]["verdict"]
            check("rolled back for disagreement",
                  verdict.get("verdict") == "roll_back" and verdict.get("reason") == "disagreement",
                  verdict)
            m = doc["models"]["magika"]
            check("version 2 still active, 3 quarantined",
                  m["active"] == 2 and "3" in m.get("quarantined", {}), m)
            check("3 is never activated",
                  tern(*store, "activate", "magika", 3, ok=False).get("error", {}).get("kind")
                  == "quarantined")
            doc = tern(*store, "load", "magika", "--backend", "cpu")
            check("the device loads version 2", doc["loaded"]["version"] == 2, doc)

            print("deploy-e2e: a replayed timestamp signed by the retired key is refused")
            (repo / "timestamp.json").write_bytes(first_timestamp)
            doc = tern(*update, ok=False)
            check("refused by signature", doc.get("error", {}).get("kind") == "signature", doc)
        finally:
            server.shutdown()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[2] == "--prepare":
        prepare(sys.argv[3])
        sys.exit(0)
    try:
        main()
    except Exception as e:  # a command that failed outright counts as one failure
        check("the scenario ran to its end", False, e)
    finish("deploy-e2e")
