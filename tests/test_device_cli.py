"""device-client's flags: a value the server would refuse, or that cannot work, is refused here first."""
import pytest

from device_client.cli import parse_args


@pytest.mark.parametrize("flag, value, says", [
    ("--tree-budget", "0", "--tree-budget must be at least 1"),
    ("--max-new-tokens", "0", "--max-new-tokens must be at least 1"),
    ("--temperature", "-1", "--temperature must be a finite number >= 0"),
    ("--temperature", "nan", "--temperature must be a finite number >= 0"),
    ("--top-p", "2", "--top-p must be in [0, 1]"),
    ("--top-k", "-3", "--top-k must be >= 0"), ("--timeout", "0", "--timeout must be a number of seconds above 0"),
    ("--timeout", "nan", "--timeout must be a number of seconds above 0"),
    ("--reconnect-s", "-1", "--reconnect-s must be a number of seconds >= 0"),
    ("--reconnect-s", "nan", "--reconnect-s must be a number of seconds >= 0"),
    ("--busy-wait-s", "-1", "--busy-wait-s must be a number of seconds >= 0"),
])
def test_a_flag_out_of_range_is_refused_with_what_it_must_be(flag, value, says, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--server", "127.0.0.1:50051", flag, value, "hello"])
    assert says in capsys.readouterr().err


def test_a_seed_is_drawn_unless_given(capsys):
    """Sampling twice without --seed gives two answers (the seed is reported to reproduce one)."""
    seeds = {parse_args(["--temperature", "0.8", "hello"]).seed for _ in range(4)}
    assert len(seeds) == 4 and all(0 <= s < 2**63 for s in seeds)
    assert parse_args(["--seed", "7", "hello"]).seed == 7
    with pytest.raises(SystemExit):
        parse_args(["--seed", "-1", "hello"])
    assert "--seed must be in 0..2^64-1" in capsys.readouterr().err


def test_the_defaults_parse():
    args = parse_args(["hello"])
    assert args.timeout > 0 and args.tree_budget >= 1 and args.prompt == "hello"


def test_a_prompt_is_needed_unless_chatting(capsys):
    with pytest.raises(SystemExit):
        parse_args([])
    assert "give the prompt, or --chat" in capsys.readouterr().err
    assert parse_args(["--chat"]).prompt is None
    with pytest.raises(SystemExit):
        parse_args(["--chat", "--raw", "hello"])
    assert "leave out --raw" in capsys.readouterr().err
