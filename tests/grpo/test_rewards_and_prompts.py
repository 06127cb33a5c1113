"""Reward functions as TRL calls them, the ways they fail (each stops the run naming the function
and the prompt's file:line), the built-in orders rewards, and hostile prompt files."""

import json

import pytest

from engine.config import ConfigError, ObjectiveConfig
from engine.data.formats import DataError
from engine.grpo.data import load_prompts
from engine.grpo.rewards import RewardError, load_reward_function, score
from engine.tasks import orders_rewards
from tests.conftest import make_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def _prompts(tmp_path, tok, rows, name="p.jsonl", **kw):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return load_prompts(str(path), tok, max_prompt_tokens=kw.pop("max_prompt_tokens", 64), **kw), str(path)


def _fn(tmp_path, body: str, name: str = "reward"):
    (tmp_path / "r.py").write_text(body)
    return load_reward_function(f"{tmp_path / 'r.py'}:{name}")


def test_standard_and_conversational_calls_look_like_trl(tmp_path, tok):
    seen = {}
    fn = _fn(tmp_path, "SEEN = {}\ndef reward(prompts, completions, completion_ids, **kw):\n"
                       "    SEEN.update(prompts=prompts, completions=completions, ids=completion_ids, kw=kw)\n"
                       "    return [1.0] * len(prompts)\n")
    plain, _ = _prompts(tmp_path, tok, [{"prompt": "hi", "answer": "a"}, {"prompt": "yo", "answer": "b", "extra": 3}])
    score([fn], plain, ["x", "y", "z", "w"], [[1], [2], [3], [4]], 2)
    seen = fn.fn.__globals__["SEEN"]
    assert seen["prompts"] == ["hi", "hi", "yo", "yo"] and seen["completions"] == ["x", "y", "z", "w"]
    assert seen["kw"] == {"answer": ["a", "a", "b", "b"], "extra": [None, None, 3, 3]} and seen["ids"] == [[1], [2], [3], [4]]
    chat, _ = _prompts(tmp_path, tok, [{"prompt": [{"role": "user", "content": "hi"}], "answer": "a"}], name="c.jsonl")
    score([fn], chat, ["x", "y"], [[1], [2]], 2)
    assert seen["prompts"] == [[{"role": "user", "content": "hi"}]] * 2
    assert seen["completions"] == [[{"role": "assistant", "content": "x"}], [{"role": "assistant", "content": "y"}]]


@pytest.mark.parametrize("body,match", [
    ("def reward(completions, **kw):\n    raise KeyError('answer')\n", r"reward function reward .* raised KeyError"),
    ("def reward(completions, **kw):\n    return [1.0]\n", r"returned 1 values for 4 completions"),
    ("def reward(completions, **kw):\n    return 1.0\n", r"returned float, not a list of 4 floats"),
    ("def reward(completions, **kw):\n    return [1.0, 'good', 0.0, 0.0]\n", r"returned 'good' for completion 1 of prompt .*p\.jsonl:1: not a number"),
    ("def reward(completions, **kw):\n    return [1.0, 1.0, float('nan'), 0.0]\n", r"returned nan for completion 0 of prompt .*p\.jsonl:2 \(use None"),
])
def test_bad_reward_functions_stop_with_their_name_and_the_prompt(tmp_path, tok, body, match):
    fn = _fn(tmp_path, body)
    prompts, _ = _prompts(tmp_path, tok, [{"prompt": "a"}, {"prompt": "b"}])
    with pytest.raises(RewardError, match=match):
        score([fn], prompts, ["w", "x", "y", "z"], [[1], [2], [3], [4]], 2)


def test_none_is_not_scored_and_numpy_numbers_are_numbers(tmp_path, tok):
    np = pytest.importorskip("numpy")
    fn = _fn(tmp_path, "import numpy as np\ndef reward(completions, **kw):\n    return [None, np.float32(0.5), True, 2]\n")
    prompts, _ = _prompts(tmp_path, tok, [{"prompt": "a"}, {"prompt": "b"}])
    table = score([fn], prompts, ["w", "x", "y", "z"], [[1], [2], [3], [4]], 2)
    assert np.isnan(table[0][0]) and [row[0] for row in table[1:]] == [0.5, 1.0, 2.0]


@pytest.mark.parametrize("spec,match", [
    ("nofile.py:f", r"file 'nofile.py' does not exist"),
    ("engine.tasks.orders_rewards:nothing", r"has no function 'nothing'"),
    ("no_such_module_xyz:f", r"cannot import module"),
    ("justaname", r"write it as"),
])
def test_reward_specs_that_do_not_load(spec, match):
    with pytest.raises(RewardError, match=match):
        load_reward_function(spec)


def test_a_reward_file_that_fails_to_import(tmp_path):
    (tmp_path / "bad.py").write_text("import not_a_module_at_all\n")
    with pytest.raises(RewardError, match=r"importing .*bad.py failed: ModuleNotFoundError"):
        load_reward_function(f"{tmp_path / 'bad.py'}:f")


def test_builtin_orders_rewards():
    answer = '{"customer":"Anna Berg","items":[{"product":"mug","color":"blue","qty":3}],"city":"Oslo","shipping":"express"}'
    near = answer.replace("Oslo", "Bergen")
    completions = [answer, "Sure: " + near, "no json", [{"role": "assistant", "content": answer}]]
    answers = [answer] * 4
    assert orders_rewards.json_valid(completions, answers) == [1.0, 1.0, 0.0, 1.0]
    assert orders_rewards.fields(completions, answers) == [1.0, 0.75, 0.0, 1.0]
    assert orders_rewards.exact_match(completions, answers) == [1.0, 0.0, 0.0, 1.0]
    assert orders_rewards.city_exact(["Oslo.", "oslo", "It is Oslo"], ["Oslo"] * 3) == [1.0, 1.0, 0.0]
    assert orders_rewards.city_mentioned(["Oslo.", "It is oslo", "Bergen"], ["Oslo"] * 3) == [1.0, 1.0, 0.0]
    assert orders_rewards.city_concise(["Oslo.", "It is oslo", "Bergen", "Oslo, Norway"],
                                       ["Oslo"] * 4) == [1.0, 0.4, 0.0, 4 / 12]


HOSTILE = [
    ('{"prompt": "fine"}', None),
    ("not json at all", r"p\.jsonl:2: field '\(line\)': not valid JSON"),
    ('["a", "list"]', r"p\.jsonl:2: field '\(line\)': must be a JSON object"),
    ('{"question": "no prompt"}', r"p\.jsonl:2: field 'prompt': missing \(fields: question\)"),
    ('{"prompt": ""}', r"p\.jsonl:2: field 'prompt': is empty"),
    ('{"prompt": 42}', r"p\.jsonl:2: field 'prompt': must be a string or a list of messages, not int"),
    ('{"prompt": []}', r"p\.jsonl:2: field 'prompt': is an empty list"),
    ('{"prompt": [{"role": "user"}]}', r"p\.jsonl:2: field 'prompt\[0\]': must be"),
    ('{"prompt": [{"role": "wizard", "content": "x"}]}', r"p\.jsonl:2: field 'prompt\[0\]\.role': 'wizard' is not one of"),
    ('{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
     r"p\.jsonl:2: field 'prompt\[1\]\.role': the last message is the assistant's"),
    ('{"prompt": "' + "word " * 200 + '"}', r"p\.jsonl:2: field 'prompt': \d+ tokens after the chat template"),
]


@pytest.mark.parametrize("line,match", [h for h in HOSTILE if h[1]])
def test_hostile_prompt_lines_name_file_line_and_field(tmp_path, tok, line, match):
    with pytest.raises(DataError, match=match):
        _prompts(tmp_path, tok, [HOSTILE[0][0], line])


def test_hostile_lines_skipped_when_asked(tmp_path, tok, capsys):
    prompts, _ = _prompts(tmp_path, tok, [h[0] for h in HOSTILE] + ["", '{"prompt": "also fine", "k": 1}'],
                          on_bad_line="skip")
    assert [p.prompt for p in prompts] == ["fine", "also fine"] and prompts[1].columns == {"k": 1}
    assert "10 line(s) skipped" in capsys.readouterr().err


def test_grpo_config_is_checked():
    ok = dict(name="grpo", loss_type="dapo", beta=0.0, rewards=["a.py:f"])
    ObjectiveConfig(**ok).validate()
    for bad, match in [(dict(rewards=[]), "objective.rewards"), (dict(rewards="a.py:f"), "objective.rewards"),
                       (dict(loss_type="sigmoid"), "objective.loss_type"), (dict(num_generations=1), "num_generations"),
                       (dict(scale_rewards="std"), "scale_rewards"), (dict(reward_weights=[1, 2]), "reward_weights"),
                       (dict(beta=-0.1), "objective.beta"), (dict(temperature=0.0), "temperature"),
                       (dict(top_p=0.0), "top_p")]:
        with pytest.raises(ConfigError, match=match):
            ObjectiveConfig(**{**ok, **bad}).validate()
    with pytest.raises(ConfigError, match="objective.rewards"):
        ObjectiveConfig(name="dpo", rewards=["a.py:f"]).validate()
