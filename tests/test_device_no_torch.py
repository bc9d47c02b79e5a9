"""The device runtime imports and drafts with torch and transformers unavailable."""
import subprocess
import sys

from conftest import ROOT

SCRIPT = r"""
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "edge_server"):
            raise ImportError(f"{name} is hidden in this test")
        return None

sys.meta_path.insert(0, Block())
import device_client.cli, device_client.session, device_client.text
from device_client.drafters.ngram import NgramDrafter
from device_client.drafters.none import NoDrafter
tree = NgramDrafter().propose([1, 2, 3, 1, 2], None, 8)
assert tree.tokens[:2] == (2, 3), tree
assert len(NoDrafter().propose([4], None, 8)) == 1
heavy = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "edge_server")]
assert not heavy, heavy
print("ok")
"""


def test_device_package_runs_without_torch():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
