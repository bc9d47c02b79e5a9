"""The README's first command: an edge server and a device client on this machine.

Starts `edge-server` on a free loopback port with the embedded model, runs `device-client`
once with the best drafter the server offers and once without speculation (the baseline),
prints both answers and summaries; then samples one answer twice with the same seed, with
speculation and by the server alone, and says whether the tokens are the same (they must be:
edge_server/sampling.py); then once more through an emulated link that resets the connection
every 0.7 s (scripts/netem.py), which the client resumes each time, and says whether the tokens
are still the same; then stops the server.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent
SAMPLED = ["--temperature", "0.8", "--seed", "7", "--json", "--max-new-tokens", "96"]


def sample(address: str, mode: str, prompt: str) -> list[int]:
    """One sampled answer's tokens; prints its summary line."""
    out = subprocess.run([str(BIN / "device-client"), "--server", address, "--mode", mode, *SAMPLED, prompt],
                         check=True, capture_output=True, text=True)
    print(out.stderr.strip(), flush=True)  # the summary line
    return json.loads(out.stdout.strip().splitlines()[-1])["token_ids"]


def breaking_link(upstream: str) -> tuple[subprocess.Popen, str]:
    """A loopback link that resets every connection each 0.7 s, and its address."""
    proxy = subprocess.Popen([sys.executable, str(HERE / "netem.py"), "--profile", "lan", "--drop-every-s", "0.7",
                              "--upstream", upstream, "--json"], stdout=subprocess.PIPE, text=True)
    return proxy, json.loads(proxy.stdout.readline())["listen"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("prompt", nargs="?", default="Write a Python function that checks whether a "
                        "number is prime, then explain how it works.")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    args = parser.parse_args()
    from edge_server.launcher import ServerProcess

    print("demo: starting edge-server (the first start converts the embedded model, ~30 s) ...", flush=True)
    with ServerProcess(["--host", "127.0.0.1", "--log-level", "WARNING"], echo=True) as server:
        for drafter in ("auto", "none"):
            print(f"\n=== device-client --server {server.address} --drafter {drafter} ===", flush=True)
            subprocess.run([str(BIN / "device-client"), "--server", server.address, "--drafter", drafter,
                            "--max-new-tokens", str(args.max_new_tokens), args.prompt], check=True)
        sampled = []
        for mode in ("speculative", "server-ar"):
            print(f"\n=== device-client --server {server.address} {' '.join(SAMPLED)} --mode {mode} ===", flush=True)
            sampled.append(sample(server.address, mode, args.prompt))
        proxy, link = breaking_link(server.address)
        try:
            print(f"\n=== the same through a link that resets the connection every 0.7 s: "
                  f"device-client --server {link} ... ===", flush=True)
            sampled.append(sample(link, "speculative", args.prompt))
        finally:
            proxy.terminate()
            proxy.wait(30)
        same = sampled[0] == sampled[1] == sampled[2]
        print(f"\nsampled with seed 7: the same {len(sampled[0])} tokens with and without speculation, and over "
              f"the breaking link: {'yes' if same else 'NO (a bug: please report it)'}")
        if not same:
            sys.exit(1)


if __name__ == "__main__":
    main()
