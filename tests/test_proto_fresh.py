"""The committed protocol stubs are what proto/edgespec.proto generates today."""
import importlib.util

from conftest import ROOT


def test_generated_stubs_are_fresh(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(tmp_path)
    for name in gen.GENERATED:
        committed = (ROOT / "shared" / "protocol" / name).read_text()
        assert (tmp_path / name).read_text() == committed, (
            f"shared/protocol/{name} is stale: run python scripts/gen_proto.py")
