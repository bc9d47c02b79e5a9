"""The README's first command: an edge server and a device client on this machine.

Starts `edge-server` on a free loopback port with the embedded model, runs `device-client`
once with the best drafter the server offers and once without speculation (the baseline),
prints both answers and summaries, then stops the server.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def start_server() -> tuple[subprocess.Popen, str]:
    print("demo: starting edge-server (the first start converts the embedded model, ~30 s) ...", flush=True)
    proc = subprocess.Popen([str(BIN / "edge-server"), "--host", "127.0.0.1", "--port", "0",
                             "--log-level", "WARNING"], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        found = re.search(r"edge-server listening on (\S+)", line)
        if found:
            return proc, found.group(1)
    raise SystemExit("demo: edge-server exited before listening; see the messages above")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("prompt", nargs="?", default="Write a Python function that checks whether a "
                        "number is prime, then explain how it works.")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    args = parser.parse_args()
    proc, address = start_server()
    try:
        for drafter in ("auto", "none"):
            print(f"\n=== device-client --drafter {drafter} ===", flush=True)
            subprocess.run([str(BIN / "device-client"), "--server", address, "--drafter", drafter,
                            "--max-new-tokens", str(args.max_new_tokens), args.prompt], check=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
