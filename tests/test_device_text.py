"""The device tokenizes exactly like transformers does on the server side, without torch."""
from conftest import PROMPTS


def test_chat_ids_match_apply_chat_template(client, loaded):
    _, _, tokenizer = client
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        expected = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        assert tokenizer.chat_ids(prompt) == expected


def test_system_prompt_and_raw_mode(client, loaded):
    _, _, tokenizer = client
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.chat_ids("Hi", system="Be brief.") == loaded.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True)
    assert tokenizer.raw_ids("Hello world") == loaded.tokenizer("Hello world").input_ids


def test_artifacts_are_cached_by_digest(client, tmp_path):
    from device_client import artifacts
    from shared.fingerprint import sha256_file

    stub, info, _ = client
    entry = next(a for a in info.artifacts if a.name == "tokenizer.json")
    path = artifacts.fetch(stub, entry, root=tmp_path)
    assert path.parent.name == entry.sha256 == sha256_file(path)
    assert entry.sha256 == info.tokenizer_fingerprint
    assert artifacts.fetch(stub, entry, root=tmp_path) == path
