"""Run the node mirror on an embedded default: no TCR account needed.

Starts a local docker-registry as the upstream, pushes a small demo image
into it, runs ``tcr-mirror node`` in front of it on 127.0.0.1:5000, pulls
the image through the mirror with skopeo, and then keeps the mirror
running until Ctrl-C (or exits at once with ``--once``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.images import push_index  # noqa: E402
from support.node import NodeProcess  # noqa: E402
from support.registry import Registry  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--once", action="store_true", help="pull once, then stop")
    parser.add_argument("--listen", default="127.0.0.1:5000", help="mirror address")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tcr-mirror-demo-"))
    (work / "registry").mkdir()
    registry = Registry(work / "registry")
    registry.start()
    node = None
    try:
        index = push_index(registry, "demo/app", "v1", layer_sizes=[2 << 20, 4096])
        print(f"upstream registry: {registry.url} (demo/app:v1 = {index.index_digest})")
        node = NodeProcess(
            work / "data",
            ["--upstream", registry.url, "--listen", args.listen],
            log_path=work / "node.log",
        )
        node.start()
        print(f"node mirror:       {node.url} (log: {node.log_path})")
        for attempt in ("cold", "warm"):
            started = time.monotonic()
            source = f"docker://{node.address}/demo/app:v1"
            subprocess.run(
                ["skopeo", "--insecure-policy", "copy", "--all",
                 "--src-tls-verify=false", source, f"oci:{work / attempt}"],
                check=True, capture_output=True,
            )  # fmt: skip
            took = time.monotonic() - started
            print(f"skopeo pull through the mirror ({attempt}): {took:.2f} s")
        seen = [
            e for e in registry.access_log() if e.user_agent.startswith("tcr-mirror/")
        ]
        print(f"requests the upstream saw from the mirror: {len(seen)}")
        for entry in seen:
            print(f"  {entry.method} {entry.path} {entry.status}")
        if not args.once:
            print("\nThe mirror keeps serving; try:")
            print(f"  curl -s {node.url}/v2/demo/app/manifests/v1")
            print("Ctrl-C to stop.")
            while node.process is not None and node.process.poll() is None:
                time.sleep(1)
    except KeyboardInterrupt:
        pass
    except BaseException:
        # Kept for its logs: the node's and the registry's say what failed.
        print(f"demo failed; its files are kept in {work}", file=sys.stderr)
        raise
    finally:
        if node is not None:
            node.stop()
        registry.stop()
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
