"""The embedded model converts once, under a lock, and a half-written folder is never used."""
import threading
from pathlib import Path

from edge_server import model_store


def test_conversion_runs_once_and_skips_half_written(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGESPEC_HOME", str(tmp_path))
    calls = []

    def fake_convert(gguf: Path, target: Path) -> None:
        calls.append(target)
        target.mkdir(parents=True, exist_ok=True)
        (target / "config.json").write_text("{}")
        (target / model_store._COMPLETE).write_text("{}")

    monkeypatch.setattr(model_store, "_convert_gguf", fake_convert)
    # a folder left by a crashed conversion (no COMPLETE marker) must not be used
    gguf = model_store.embedded_gguf_path()
    stale = tmp_path / "models" / f"{model_store.DEFAULT_MODEL}-{model_store._file_digest(gguf)}"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("half")
    threads = [threading.Thread(target=model_store.embedded_model_dir) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert (stale / model_store._COMPLETE).is_file()
    assert model_store.embedded_model_dir() == stale
    assert len(calls) == 1


def test_converted_model_matches_gguf_config(loaded):
    cfg = loaded.model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.rope_theta) == (49152, 576, 100000.0)
